"""Model manager: the registry in ``Resources/Models.json``, imported models, checksums.

``Models.json`` is ``{"models": [{"name", "task", "modality", "file", "sha256", "config", "card"}, ...]}``.
``file``, ``config`` and ``card`` are paths relative to the folder of ``Models.json`` (models
shipped with the extension) or ``http(s)://`` URLs (models the backend downloads into the user
cache). Models the user imports from a local file are copied into their own folder under the
user models folder (weights plus ``config.json`` beside them, the layout the backend's
``--model PATH`` expects) and listed in ``imported.json`` there, with the sha256 computed at
import; the worker gets their path, registry models go by name (``--model NAME``).

No Qt here: opening a folder in the file browser is done by the module (``qt.QDesktopServices``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

IMPORTED_INDEX = "imported.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_CHUNK = 1 << 20


@dataclass
class ModelEntry:
    """One model; ``path`` is the local weights file (None when it is only a URL)."""

    name: str
    task: str
    file: str
    modality: str = "any"
    sha256: str = ""
    config: str = ""
    card: str = ""
    source: str = "registry"  # "registry" or "imported"
    path: str | None = None

    @property
    def isRemote(self) -> bool:
        return self.file.startswith(("http://", "https://"))

    def modelArgument(self) -> str:
        """What to pass as ``--model``: the name for registry models, the path for imports."""
        return self.path if self.source == "imported" and self.path else self.name

    def label(self) -> str:
        suffix = " (imported)" if self.source == "imported" else (" (download)" if self.isRemote and not self.available else "")
        return f"{self.name}{suffix}"

    @property
    def available(self) -> bool:
        return bool(self.path) and Path(self.path).is_file()


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
            return f"{self.entry.name}: not downloaded yet (downloaded and verified on first use)"
        return f"{self.entry.name}: no checksum recorded (sha256 {self.actual[:12]}...)"


def sha256File(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        if self.registryPath is None or not self.registryPath.is_file():
            return []
        try:
            data = json.loads(self.registryPath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read model registry {self.registryPath}: {error}") from None
        entries = []
        for record in data.get("models", []) if isinstance(data, dict) else []:
            if not isinstance(record, dict) or not record.get("name"):
                continue
            entry = ModelEntry(
                name=str(record["name"]),
                task=str(record.get("task", "")),
                file=str(record.get("file", "")),
                modality=str(record.get("modality", "any") or "any"),
                sha256=str(record.get("sha256", "") or "").lower(),
                config=str(record.get("config", "") or ""),
                card=str(record.get("card", "") or ""),
                source="registry",
            )
            entry.path = self._localPath(entry)
            entries.append(entry)
        return entries

    def _localPath(self, entry: ModelEntry) -> str | None:
        if not entry.file:
            return None
        if entry.isRemote:
            cached = self.userModelsDir / "cache" / safeName(entry.name) / Path(entry.file.split("?")[0]).name
            return str(cached)
        path = Path(entry.file)
        if not path.is_absolute() and self.registryPath is not None:
            path = self.registryPath.parent / path
        return str(path)

    def importedEntries(self) -> list[ModelEntry]:
        index = self.userModelsDir / IMPORTED_INDEX
        if not index.is_file():
            return []
        try:
            records = json.loads(index.read_text(encoding="utf-8")).get("models", [])
        except (OSError, ValueError, AttributeError):
            return []
        entries = []
        for record in records:
            try:
                entries.append(ModelEntry(**{**record, "source": "imported"}))
            except TypeError:
                continue
        return entries

    def models(self, task: str | None = None, modality: str | None = None) -> list[ModelEntry]:
        """Registry models first, then imported ones; only ``task`` (and ``modality`` or "any") ones when given."""
        entries = self.registryEntries() + self.importedEntries()
        return [
            e for e in entries
            if (task is None or not e.task or e.task == task)
            and (modality is None or e.modality in (modality.lower(), "any"))
        ]

    def find(self, name: str) -> ModelEntry | None:
        for entry in self.models():
            if entry.name == name or entry.modelArgument() == name:
                return entry
        return None

    # --- import -----------------------------------------------------------------------
    def importFile(self, path: str | os.PathLike, name: str | None = None, task: str = "affine",
                   config: str | os.PathLike | None = None, expectedSha256: str | None = None,
                   modality: str = "any") -> ModelEntry:
        """Copy a local weights file (or a model folder) and its config into the user models
        folder and list it; returns the new entry.

        ``path`` is a weights file (.safetensors/.pt/.pth) or a folder holding
        ``model.safetensors`` (or ``ema.safetensors``/``model.pt``) and ``config.json``. For a file,
        the config is ``config`` or found beside it as ``config.json`` or ``<stem>.json``; it is
        stored as ``config.json`` beside the copied weights. Raises ValueError when
        ``expectedSha256`` is given and does not match.
        """
        source = Path(path)
        if source.is_dir():
            for candidate in ("model.safetensors", "ema.safetensors", "model.pt"):
                if (source / candidate).is_file():
                    if config is None and (source / "config.json").is_file():
                        config = source / "config.json"
                    name = name or source.name
                    source = source / candidate
                    break
            else:
                raise FileNotFoundError(f"model folder {source} holds no model.safetensors, ema.safetensors or model.pt")
        if not source.is_file():
            raise FileNotFoundError(f"model file not found: {source}")
        if not source.name.lower().endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"model file {source.name} must be {', '.join(WEIGHT_SUFFIXES)}")
        digest = sha256File(source)
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
        entry = ModelEntry(modelName, task, str(weights), modality, digest, configTarget, "", "imported", str(weights))
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
        if not entry.path or not Path(entry.path).is_file():
            return VerifyResult(entry, "not downloaded" if entry.isRemote else "missing")
        actual = sha256File(entry.path)
        if not entry.sha256:
            return VerifyResult(entry, "no checksum", actual)
        return VerifyResult(entry, "ok" if actual == entry.sha256.lower() else "mismatch", actual)

    def verifyAll(self, task: str | None = None) -> list[VerifyResult]:
        return [self.verify(e) for e in self.models(task)]
