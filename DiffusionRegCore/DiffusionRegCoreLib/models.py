"""Model manager: registry models (installed or downloadable), imported models, checksums.

The registry (``Resources/Models.json``), its per-user download cache and checksums are read
with the backend's own torch-free reader, ``diffusionreg/registry.py`` (see
:func:`.paths.backendModule`), so the panel and the worker agree on every entry. Downloading is
the backend's job (``diffusionreg models pull NAME``, run as a worker process with progress).

Models the user imports from a local file are copied into their own folder under the user
models folder (weights plus ``config.json`` beside them, the layout the backend's
``--model PATH`` expects) and listed in ``imported.json`` there, with the sha256 computed at
import; the worker gets their path, registry models go by name (``--model NAME``).

No Qt here: opening a folder in the file browser is done by the module (``qt.QDesktopServices``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import paths

IMPORTED_INDEX = "imported.json"


def _registry():
    return paths.backendModule("registry")


def sha256File(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (the backend's definition)."""
    return _registry().sha256_file(path)


@dataclass
class ModelEntry:
    """One model as the panel shows it; ``path`` is where its weights are or will be downloaded to."""

    name: str
    task: str
    modality: str = "any"
    sha256: str = ""
    config: str = ""
    card: str = ""
    source: str = "registry"  # "registry" or "imported"
    path: str | None = None
    url: str = ""  # registry models that can be downloaded
    modalities: tuple = ()  # every modality it serves when several (registry ``modalities``)

    @property
    def served(self) -> tuple:
        """The modalities this model serves: ``modalities``, else ``(modality,)``."""
        return tuple(self.modalities) or (self.modality,)

    def serves(self, modality: str) -> bool:
        """Whether it runs for ``modality``: one it lists, or any modality for a generic (``any``-only) model."""
        return modality in self.served or self.served == ("any",)

    @property
    def isRemote(self) -> bool:
        return bool(self.url)

    @property
    def available(self) -> bool:
        return bool(self.path) and Path(self.path).is_file()

    @property
    def state(self) -> str:
        """``installed``, ``downloadable`` (``diffusionreg models pull NAME`` fetches it) or ``missing``."""
        if self.available:
            return "installed"
        return "downloadable" if self.isRemote else "missing"

    def modelArgument(self) -> str:
        """What to pass as ``--model``: the name for registry models, the path for imports."""
        return self.path if self.source == "imported" and self.path else self.name

    def label(self) -> str:
        if self.source == "imported":
            return f"{self.name} (imported)"
        return f"{self.name} (download)" if self.state == "downloadable" else self.name


@dataclass
class VerifyResult:
    entry: ModelEntry
    status: str  # "ok", "mismatch", "missing", "no checksum", "not downloaded"
    actual: str = ""

    def text(self) -> str:
        if self.status == "ok":
            return f"{self.entry.name}: checksum OK"
        if self.status == "mismatch":
            return f"{self.entry.name}: CHECKSUM MISMATCH (expected {self.entry.sha256[:12]}..., got {self.actual[:12]}...)"
        if self.status == "missing":
            return f"{self.entry.name}: file missing ({self.entry.path})"
        if self.status == "not downloaded":
            return f"{self.entry.name}: not downloaded yet (Download fetches and verifies it)"
        return f"{self.entry.name}: no checksum recorded (sha256 {self.actual[:12]}...)"


def safeName(text: str) -> str:
    """A file-system friendly model name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return name or "model"


class ModelManager:
    """Lists registry and imported models, imports local files, verifies checksums."""

    def __init__(self, registryPath: str | os.PathLike | None, userModelsDir: str | os.PathLike) -> None:
        self.registryPath = Path(registryPath) if registryPath else None
        self.userModelsDir = Path(userModelsDir)

    # --- listing ----------------------------------------------------------------------
    def registryEntries(self) -> list[ModelEntry]:
        """Registry models, each with its local weights path (shipped file or download cache)."""
        if self.registryPath is None:
            return []
        registry = _registry()
        return [
            ModelEntry(
                name=e.name,
                task=e.task,
                modality=e.modality,
                sha256=e.sha256 or "",
                config=str(e.config or ""),
                card=str(e.card or ""),
                source="registry",
                path=str(e.file),
                url=e.url or "",
                modalities=tuple(e.modalities),
            )
            for e in registry.read_entries(self.registryPath, cache=self.userModelsDir / "cache")
        ]

    def importedEntries(self) -> list[ModelEntry]:
        index = self.userModelsDir / IMPORTED_INDEX
        if not index.is_file():
            return []
        try:
            records = json.loads(index.read_text(encoding="utf-8")).get("models", [])
        except (OSError, ValueError, AttributeError):
            return []
        known = {f.name for f in fields(ModelEntry)}
        entries = []
        for record in records:
            try:  # keys of older releases (e.g. "file") are dropped
                entries.append(ModelEntry(**{**{k: v for k, v in record.items() if k in known}, "source": "imported"}))
            except (TypeError, AttributeError):
                continue
        return entries

    def models(self, task: str | None = None, modality: str | None = None) -> list[ModelEntry]:
        """Registry models first, then imported ones; only ``task`` (and ``modality`` or "any") ones when given."""
        entries = self.registryEntries() + self.importedEntries()
        return [
            e
            for e in entries
            if (task is None or not e.task or e.task == task) and (modality is None or e.serves(modality.lower()))
        ]

    def find(self, name: str, task: str | None = None) -> ModelEntry | None:
        for entry in self.models(task):
            if entry.name == name or entry.modelArgument() == name:
                return entry
        return None

    @staticmethod
    def inferenceDefaults(entry: ModelEntry) -> dict:
        """The model's registration defaults, the ``inference`` section of its config.json (e.g.
        ``{"steps": null, "bidirectional": false, "initialize": "moments", "refine": {...}}``): what
        the backend uses for every option the panel does not pass. Empty when there is no config."""
        if not entry.config or not Path(entry.config).is_file():
            return {}
        try:
            section = json.loads(Path(entry.config).read_text(encoding="utf-8")).get("inference", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return section if isinstance(section, dict) else {}

    # --- import -----------------------------------------------------------------------
    def importFile(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        task: str = "affine",
        config: str | os.PathLike | None = None,
        expectedSha256: str | None = None,
        modality: str = "any",
    ) -> ModelEntry:
        """Copy a local weights file (or a model folder) and its config into the user models
        folder and list it; returns the new entry.

        ``path`` is a weights file (.safetensors/.pt/.pth) or a folder holding one of the
        backend's model file names and ``config.json``. For a file, the config is ``config`` or
        found beside it as ``config.json`` or ``<stem>.json``; it is stored as ``config.json``
        beside the copied weights. Raises ValueError when ``expectedSha256`` is given and does
        not match.
        """
        registry = _registry()
        source = Path(path)
        if source.is_dir():
            for candidate in registry.WEIGHT_NAMES:
                if (source / candidate).is_file():
                    if config is None and (source / "config.json").is_file():
                        config = source / "config.json"
                    name = name or source.name
                    source = source / candidate
                    break
            else:
                raise FileNotFoundError(f"model folder {source} holds none of {', '.join(registry.WEIGHT_NAMES)}")
        if not source.is_file():
            raise FileNotFoundError(f"model file not found: {source}")
        if not source.name.lower().endswith(registry.WEIGHT_SUFFIXES):
            raise ValueError(f"model file {source.name} must be {', '.join(registry.WEIGHT_SUFFIXES)}")
        digest = registry.sha256_file(source)
        if expectedSha256 and digest.lower() != expectedSha256.lower():
            raise ValueError(f"{source.name}: sha256 {digest} does not match the expected {expectedSha256}")
        modelName = safeName(name or source.name.split(".")[0])
        existing = {e.name for e in self.models()}
        base, n = modelName, 2
        while modelName in existing:
            modelName = f"{base}-{n}"
            n += 1
        target = self.userModelsDir / "imported" / modelName
        target.mkdir(parents=True, exist_ok=True)
        weights = target / source.name
        shutil.copy2(source, weights)
        configTarget = ""
        configSource = Path(config) if config else None
        if configSource is None:
            for candidate in (source.with_name("config.json"), source.with_name(source.name.split(".")[0] + ".json")):
                if candidate.is_file() and candidate != source:
                    configSource = candidate
                    break
        if configSource is not None:
            if not configSource.is_file():
                raise FileNotFoundError(f"model config not found: {configSource}")
            shutil.copy2(configSource, target / "config.json")
            configTarget = str(target / "config.json")
        entry = ModelEntry(modelName, task, modality, digest, configTarget, "", "imported", str(weights))
        self._writeImported(self.importedEntries() + [entry])
        return entry

    def removeImported(self, name: str) -> bool:
        entries = self.importedEntries()
        keep = [e for e in entries if e.name != name]
        if len(keep) == len(entries):
            return False
        self._writeImported(keep)
        shutil.rmtree(self.userModelsDir / "imported" / safeName(name), ignore_errors=True)
        return True

    def _writeImported(self, entries: list[ModelEntry]) -> None:
        self.userModelsDir.mkdir(parents=True, exist_ok=True)
        index = self.userModelsDir / IMPORTED_INDEX
        temporary = index.with_name(index.name + ".tmp")
        temporary.write_text(json.dumps({"models": [asdict(e) for e in entries]}, indent=2), encoding="utf-8")
        os.replace(temporary, index)

    # --- checksums --------------------------------------------------------------------
    def verify(self, entry: ModelEntry) -> VerifyResult:
        if not entry.available:
            return VerifyResult(entry, "not downloaded" if entry.isRemote else "missing")
        actual = sha256File(entry.path)
        if not entry.sha256:
            return VerifyResult(entry, "no checksum", actual)
        return VerifyResult(entry, "ok" if actual == entry.sha256.lower() else "mismatch", actual)

    def verifyAll(self, task: str | None = None) -> list[VerifyResult]:
        return [self.verify(e) for e in self.models(task)]
