"""Registry of shipped models (``Resources/Models.json``) and safe weight loading.

``Models.json``::

    {"models": [{"name": "brain-mri", "task": "affine", "modality": "mri",
                 "file": "Models/brain-mri/model.safetensors", "sha256": "...",
                 "config": "Models/brain-mri/config.json",
                 "card": "Models/brain-mri/MODEL_CARD.md"}]}

Paths are relative to the folder holding ``Models.json`` (``Resources/``; override with the
environment variable ``DIFFUSIONREG_MODELS`` = path to another Models.json). Weights are
verified against their sha256 before loading, and only loaded by safetensors or by
``torch.load(weights_only=True)`` -- never by unpickling arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffusionreg.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def models_json_path() -> Path:
    env = os.environ.get("DIFFUSIONREG_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "Resources" / "Models.json"


@dataclass(frozen=True)
class ModelEntry:
    """One model: absolute paths; ``sha256`` None for user-supplied paths (not verified)."""

    name: str
    task: str
    modality: str
    file: Path
    config: Path | None
    sha256: str | None = None
    card: Path | None = None


def _read_registry(path: Path | None = None) -> list[dict]:
    path = path or models_json_path()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read model registry {path}: {exc}") from exc
    return list(data.get("models", []))


def list_models(task: str | None = None, registry: Path | None = None) -> list[ModelEntry]:
    """Entries of the registry (optionally of one task), paths made absolute."""
    registry = registry or models_json_path()
    root = registry.parent
    out = []
    for item in _read_registry(registry):
        if task is not None and item.get("task") != task:
            continue
        out.append(ModelEntry(
            name=item["name"], task=item.get("task", ""), modality=item.get("modality", "any"),
            file=root / item["file"], config=root / item["config"] if item.get("config") else None,
            sha256=item.get("sha256"), card=root / item["card"] if item.get("card") else None))
    return out


def resolve(name_or_path: str | os.PathLike | None, task: str, modality: str | None = None,
            registry: Path | None = None) -> ModelEntry:
    """A registered name, a weights file (config.json beside it) or a folder holding
    ``model.safetensors`` (or ``ema.safetensors``) and ``config.json``. With None, the first
    registered model of ``task`` for ``modality`` (then one for 'any')."""
    entries = list_models(task, registry)
    if name_or_path is None:
        for want in (modality, "any"):
            for e in entries:
                if e.modality == want:
                    return e
        raise InputError(f"no {task} model registered for modality {modality!r}; "
                         f"pass --model NAME|PATH (registered: "
                         f"{', '.join(e.name for e in entries) or 'none'})")
    text = str(name_or_path)
    for e in entries:
        if e.name == text:
            return e
    path = Path(text)
    if path.is_dir():
        for cand in ("model.safetensors", "ema.safetensors", "model.pt"):
            if (path / cand).exists():
                cfg = path / "config.json"
                return ModelEntry(path.name, task, modality or "any", path / cand,
                                  cfg if cfg.exists() else None)
        raise InputError(f"model folder {path} holds no model.safetensors")
    if path.exists():
        if not path.name.lower().endswith(WEIGHT_SUFFIXES):
            raise InputError(f"model file {path} must be .safetensors, .pt or .pth")
        cfg = path.with_name("config.json")
        return ModelEntry(path.stem, task, modality or "any", path, cfg if cfg.exists() else None)
    raise InputError(f"unknown model {text!r}: not a registered name "
                     f"({', '.join(e.name for e in entries) or 'none'}) nor an existing path")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(entry: ModelEntry) -> None:
    """Raise InputError if the weights are missing or do not match the registered sha256."""
    if not entry.file.exists():
        raise InputError(f"model weights not found: {entry.file}")
    if entry.sha256:
        got = sha256_file(entry.file)
        if got != entry.sha256:
            raise InputError(f"model {entry.name}: sha256 mismatch for {entry.file} "
                             f"(expected {entry.sha256[:12]}..., got {got[:12]}...)")


def load_state_dict(entry: ModelEntry) -> dict:
    """Verify, then load tensors safely (safetensors, or torch weights_only)."""
    verify(entry)
    name = entry.file.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(entry.file))
    import torch
    try:
        state = torch.load(entry.file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or corrupt
        raise InputError(f"cannot load weights {entry.file}: {exc}") from exc
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        return state["ema"]  # a training checkpoint: use its EMA weights
    if not isinstance(state, dict):
        raise InputError(f"weights file {entry.file} does not hold a state dict")
    return state


def load_config_json(entry: ModelEntry) -> dict:
    if entry.config is None or not entry.config.exists():
        raise InputError(f"model {entry.name}: config.json not found beside {entry.file}")
    try:
        return json.loads(entry.config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read model config {entry.config}: {exc}") from exc


def register_entry(name: str, task: str, modality: str, file: Path, config: Path,
                   card: Path | None = None, registry: Path | None = None) -> dict:
    """Add or replace the entry of (``name``, ``task``) (with the file's sha256) keeping the others;
    atomic write. One name may serve several tasks (``brain-mri`` affine and deformable)."""
    registry = registry or models_json_path()
    root = registry.parent
    items = [m for m in _read_registry(registry) if (m.get("name"), m.get("task")) != (name, task)]
    entry = {"name": name, "task": task, "modality": modality,
             "file": os.path.relpath(file, root), "sha256": sha256_file(file),
             "config": os.path.relpath(config, root)}
    if card is not None:
        entry["card"] = os.path.relpath(card, root)
    items.append(entry)
    tmp = registry.with_name(registry.name + ".tmp")
    tmp.write_text(json.dumps({"models": items}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, registry)
    return entry
