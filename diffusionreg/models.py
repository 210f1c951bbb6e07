"""Choosing a model (registered name, folder or file) and loading its weights safely.

The registry itself (``Resources/Models.json``, the user cache, entries) is
:mod:`diffusionreg.registry`, shared with the Slicer side. Weights are verified against their
registered sha256 before loading -- also when the model is given by the path of a registered
model's file or folder -- and only loaded by safetensors or by ``torch.load(weights_only=True)``,
never by unpickling arbitrary objects. A path that no registry entry holds is used unverified,
and says so in one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from diffusionreg import registry
from diffusionreg.errors import InputError
from diffusionreg.registry import (
    WEIGHT_NAMES,
    WEIGHT_SUFFIXES,
    RegistryEntry,
    sha256_file,
)
from diffusionreg.vocabulary import ANY_MODALITY

ModelEntry = RegistryEntry
UNVERIFIED_NOTE = "unverified model file (no registry entry)"

__all__ = [
    "UNVERIFIED_NOTE",
    "WEIGHT_SUFFIXES",
    "ModelEntry",
    "list_models",
    "load_config_json",
    "load_state_dict",
    "models_json_path",
    "register_entry",
    "resolve",
    "sha256_file",
    "verify",
]


def models_json_path() -> Path:
    return registry.default_registry_path()


def list_models(task: str | None = None, registry_path: Path | None = None) -> list[ModelEntry]:
    """Entries of the registry (optionally of one task), paths absolute."""
    try:
        return registry.read_entries(registry_path, task)
    except registry.RegistryError as error:
        raise InputError(str(error)) from None


def resolve(
    name_or_path: str | os.PathLike | None, task: str, modality: str | None = None, registry_path: Path | None = None
) -> ModelEntry:
    """A registered name, a weights file (config.json beside it) or a folder holding
    ``model.safetensors`` (or ``ema.safetensors`` / ``model.pt``) and ``config.json``. With None,
    the first registered model of ``task`` that lists ``modality``, installed ones first, then a
    generic one (whose only modality is ``any``). A conditional model that lists ``any`` among
    others (its agnostic class) serves ``any``, not every modality: it runs only the classes it was
    trained for. A path that is a registered model's file or folder resolves to that entry
    (verified)."""
    entries = list_models(task, registry_path)
    if name_or_path is None:
        ordered = sorted(entries, key=lambda e: not e.installed)  # stable: file order otherwise
        for e in ordered:
            if modality in e.served:
                return e
        for e in ordered:
            if e.served == (ANY_MODALITY,):
                return e
        raise InputError(
            f"no {task} model registered for modality {modality!r}; pass --model NAME|PATH (registered: {_names(entries)})"
        )
    text = str(name_or_path)
    for e in entries:
        if e.name == text:
            return e
    path = Path(text)
    if path.exists():
        held = _registered_holder(path, task, registry_path)
        if held is not None:
            return held
    if path.is_dir():
        for cand in WEIGHT_NAMES:
            if (path / cand).exists():
                cfg = path / "config.json"
                return ModelEntry(path.name, task, modality or "any", path / cand, cfg if cfg.exists() else None)
        raise InputError(f"model folder {path} holds no {', '.join(WEIGHT_NAMES)}")
    if path.exists():
        if not path.name.lower().endswith(WEIGHT_SUFFIXES):
            raise InputError(f"model file {path} must be {', '.join(WEIGHT_SUFFIXES)}")
        cfg = path.with_name("config.json")
        return ModelEntry(path.stem, task, modality or "any", path, cfg if cfg.exists() else None)
    raise InputError(f"unknown model {text!r}: not a registered name ({_names(entries)}) nor an existing path")


def _registered_holder(path: Path, task: str, registry_path: Path | None) -> ModelEntry | None:
    """The registry entry (of ``task`` first, then any task) whose weights file or folder is ``path``."""
    entries = list_models(None, registry_path)
    same_task = [e for e in entries if e.task == task]
    return registry.entry_holding(same_task, path) or registry.entry_holding(entries, path)


def _names(entries: list[ModelEntry]) -> str:
    return ", ".join(e.name for e in entries) or "none"


def verify(entry: ModelEntry) -> None:
    """Raise InputError if the weights are missing or do not match the registered sha256;
    an entry without one (a user path) is reported as unverified on stderr."""
    if not entry.file.exists():
        if entry.downloadable:
            raise InputError(
                f"model {entry.name} ({entry.task}) is not downloaded yet: run 'diffusionreg models pull {entry.name}'"
            )
        raise InputError(f"model weights not found: {entry.file}")
    if entry.sha256 is None:
        print(f"warning: {UNVERIFIED_NOTE}: {entry.file}", file=sys.stderr, flush=True)
        return
    got = sha256_file(entry.file)
    if got != entry.sha256:
        raise InputError(
            f"model {entry.name}: sha256 mismatch for {entry.file} (expected {entry.sha256[:12]}..., got {got[:12]}...)"
        )


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
    except Exception as exc:
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


def register_entry(
    name: str,
    task: str,
    modality: str,
    file: Path,
    config: Path,
    card: Path | None = None,
    registry_path: Path | None = None,
    modalities: tuple[str, ...] = (),
) -> dict:
    """Add or replace the entry of (``name``, ``task``) with the file's sha256, keeping the others
    (atomic write, :func:`diffusionreg.registry.upsert_entry`). One name may serve several tasks;
    ``modalities``: every modality it serves when several."""
    registry_path = registry_path or models_json_path()
    root = registry_path.parent
    entry = {
        "name": name,
        "task": task,
        "modality": modality,
        "file": _relative(file, root),
        "sha256": sha256_file(file),
        "config": _relative(config, root),
    }
    if len(modalities) > 1:
        entry["modalities"] = list(modalities)
    if card is not None:
        entry["card"] = _relative(card, root)
    registry.upsert_entry(registry_path, entry)
    return entry


def _relative(path: Path, root: Path) -> str:
    """Registry paths use forward slashes on every platform."""
    return Path(os.path.relpath(path, root)).as_posix()
