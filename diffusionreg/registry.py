"""The model registry ``Resources/Models.json``: one reader and writer for the backend and Slicer.

Standard library only, and importable by file path: the Slicer side reads the registry with
this module before the backend's dependencies (torch ...) are installed.

``Models.json`` (schema: ``Resources/Models.schema.json``)::

    {"models": [{"name": "brain-mri", "task": "affine", "modality": "mri",
                 "modalities": ["mri", "ct", "any"],                  (optional: several)
                 "file": "Models/brain-mri/model.safetensors",
                 "url": "https://.../model.safetensors",          (optional: downloadable)
                 "size": 1234567,                                 (optional: bytes)
                 "sha256": "...", "config": "Models/brain-mri/config.json",
                 "card": "Models/brain-mri/MODEL_CARD.md"}]}

``modalities`` lists every modality a model serves (a conditional affine model trained on several,
with ``any`` for its agnostic class); without it the entry serves ``modality`` alone.
``file``, ``config`` and ``card`` are relative to the folder holding ``Models.json``. An entry has
a ``file`` shipped with the code, a ``url`` to download it from, or both. One name may serve
several tasks (``brain-mri`` affine and deformable); (name, task) is unique.

Where the weights of an entry are: its shipped ``file`` when that exists, else the per-user cache
(``<models dir>/cache/<task>/<name>/<file name of the url or file>``, where ``diffusionreg models
pull`` downloads and ``diffusionreg models import`` copies them) when the weights are there or the
entry has a ``url``, else the (missing) shipped ``file``.
The models dir is ``$DIFFUSIONREG_MODELS_DIR``, else ``$XDG_DATA_HOME/DiffusionReg/models``
(``%LOCALAPPDATA%\\DiffusionReg\\models`` on Windows), else ``~/.diffusionreg/models``.
``$DIFFUSIONREG_MODELS`` (a path to another Models.json) replaces the shipped registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

#: Environment variable naming another Models.json to use instead of the shipped one.
REGISTRY_ENV = "DIFFUSIONREG_MODELS"
#: Environment variable overriding the per-user models folder (cache of downloads, imports).
MODELS_DIR_ENV = "DIFFUSIONREG_MODELS_DIR"
SCHEMA_NAME = "Models.schema.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
#: File names looked for in a model folder, in order.
WEIGHT_NAMES = ("model.safetensors", "ema.safetensors", "model.pt")
_CHUNK = 1 << 20


class RegistryError(ValueError):
    """The registry cannot be read or an entry is malformed (one line naming the problem)."""


def default_registry_path() -> Path:
    """``$DIFFUSIONREG_MODELS`` or the ``Resources/Models.json`` beside the backend package
    (a source checkout and an installed Slicer extension have the same layout)."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "Resources" / "Models.json"


def user_models_dir() -> Path:
    """Per-user writable folder of downloaded and imported models (see the module docstring)."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override)
    base = os.environ.get("LOCALAPPDATA") if os.name == "nt" else os.environ.get("XDG_DATA_HOME")
    return Path(base) / "DiffusionReg" / "models" if base else Path.home() / ".diffusionreg" / "models"


def cache_dir() -> Path:
    """Where downloaded weights go: ``<models dir>/cache``."""
    return user_models_dir() / "cache"


@dataclass(frozen=True)
class RegistryEntry:
    """One model. Paths are absolute; ``sha256`` None for a user path (nothing to verify against)."""

    name: str
    task: str
    modality: str
    file: Path  # where the weights are (or will be once downloaded)
    config: Path | None
    sha256: str | None = None
    card: Path | None = None
    url: str | None = None  # download source of ``file``
    size: int | None = None  # bytes, when the registry states it
    cache_file: Path | None = None  # where the user cache keeps it (registry entries only)
    modalities: tuple[str, ...] = ()  # every modality it serves, when several (else ``modality``)

    @property
    def served(self) -> tuple[str, ...]:
        """The modalities this model serves: ``modalities``, else ``(modality,)``."""
        return self.modalities or (self.modality,)

    @property
    def installed(self) -> bool:
        """The weights are on this machine (not yet verified)."""
        return self.file.is_file()

    @property
    def downloadable(self) -> bool:
        return self.url is not None

    @property
    def state(self) -> str:
        """``installed``, ``downloadable`` (not here, has a url) or ``missing``."""
        if self.installed:
            return "installed"
        return "downloadable" if self.downloadable else "missing"

    def holds(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is this entry's weights file or the folder holding it."""
        target = Path(path)
        mine = self.file if target.is_file() else self.file.parent
        try:
            return target.exists() and mine.exists() and os.path.samefile(mine, target)
        except OSError:
            return False


def read_records(registry_path: Path | None = None) -> list[dict]:
    """The raw entries of a registry file (``[]`` when the file does not exist)."""
    path = Path(registry_path) if registry_path is not None else default_registry_path()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegistryError(f"cannot read model registry {path}: {error}") from None
    records = data.get("models") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise RegistryError(f"model registry {path} has no 'models' list")
    for index, record in enumerate(records):
        _check_record(record, f"{path} entry {index + 1}")
    return records


def _check_record(record, where: str) -> None:
    """What the reader relies on (the full rules are in Models.schema.json, checked by the tests)."""
    if not isinstance(record, dict):
        raise RegistryError(f"{where}: not an object")
    for key in ("name", "task"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise RegistryError(f"{where}: missing {key!r}")
    served = record.get("modalities", [])
    if not isinstance(served, list) or not all(isinstance(m, str) and m for m in served):
        raise RegistryError(f"{where} ({record['name']}): 'modalities' must be a list of modality names")
    if not record.get("file") and not record.get("url"):
        raise RegistryError(f"{where} ({record['name']}): needs 'file' or 'url'")


def entry_from_record(record: dict, root: Path, cache: Path | None = None) -> RegistryEntry:
    """A record of a registry in folder ``root`` with its paths resolved (see the module docstring)."""
    url = record.get("url") or None
    shipped = root / record["file"] if record.get("file") else None
    cached = cached_path(record, cache)
    if shipped is not None and (shipped.is_file() or (url is None and not cached.is_file())):
        weights = shipped
    else:
        weights = cached
    sha = record.get("sha256")
    return RegistryEntry(
        name=record["name"],
        task=record["task"],
        modality=record.get("modality", "any"),
        file=weights,
        config=root / record["config"] if record.get("config") else None,
        sha256=sha.lower() if isinstance(sha, str) and sha else None,
        card=root / record["card"] if record.get("card") else None,
        url=url,
        size=record.get("size"),
        cache_file=cached,
        modalities=tuple(record.get("modalities") or ()),
    )


def cached_path(record: dict, cache: Path | None = None) -> Path:
    """Where the user cache holds a record's weights (downloaded or imported):
    ``<cache>/<task>/<name>/<file name of the url, else of the shipped file>``."""
    source = urlparse(record["url"]).path if record.get("url") else record["file"]
    name = Path(source).name or "model.safetensors"
    return (cache if cache is not None else cache_dir()) / record["task"] / record["name"] / name


def read_entries(registry_path: Path | None = None, task: str | None = None, cache: Path | None = None) -> list[RegistryEntry]:
    """Entries of the registry (only those of ``task`` when given), in file order."""
    path = Path(registry_path) if registry_path is not None else default_registry_path()
    return [entry_from_record(r, path.parent, cache) for r in read_records(path) if task is None or r["task"] == task]


def entry_holding(entries: list[RegistryEntry], path: str | os.PathLike) -> RegistryEntry | None:
    """The entry whose weights file (or its folder) ``path`` is, else None."""
    for entry in entries:
        if entry.holds(path):
            return entry
    return None


def upsert_entry(registry_path: Path, entry: dict) -> None:
    """Add ``entry`` (a raw record, paths relative to the registry's folder) or replace the
    record with the same name and task in place; the file is replaced atomically."""
    registry_path = Path(registry_path)
    _check_record(entry, f"new entry for {registry_path}")
    records = read_records(registry_path)
    key = (entry["name"], entry["task"])
    for index, record in enumerate(records):
        if (record["name"], record["task"]) == key:
            records[index] = dict(entry)
            break
    else:
        records.append(dict(entry))
    write_records(registry_path, records)


def write_records(registry_path: Path, records: list[dict]) -> None:
    """Write the registry atomically (temporary file in the same folder, then rename)."""
    registry_path = Path(registry_path)
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"$schema": f"./{SCHEMA_NAME}", "models": records}, indent=2) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{registry_path.name}.", suffix=".tmp", dir=registry_path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, registry_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
