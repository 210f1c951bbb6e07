"""Where things are, from a source checkout and from an installed extension alike.

Source checkout (modules added under Application Settings > Modules)::

    <repo>/diffusionreg/                      backend package
    <repo>/Resources/Models.json              model registry, shipped models, sample data
    <repo>/DiffusionRegCore/DiffusionRegCoreLib/paths.py
    <repo>/DiffusionRegCore/Resources/requirements.txt

Installed extension (every scripted module of the extension shares one flat folder)::

    <qt-scripted-modules>/diffusionreg/
    <qt-scripted-modules>/Resources/Models.json
    <qt-scripted-modules>/DiffusionRegCoreLib/paths.py
    <qt-scripted-modules>/Resources/requirements.txt
"""

from __future__ import annotations

import os
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent
MODULE_DIR = LIB_DIR.parent

#: Environment variable that overrides where the backend package is found (developers).
BACKEND_ROOT_ENV = "DIFFUSIONREG_BACKEND_ROOT"
#: Environment variable that overrides the user model folder.
MODELS_DIR_ENV = "DIFFUSIONREG_MODELS_DIR"
#: The backend's override of its model registry (path to another Models.json).
MODELS_REGISTRY_ENV = "DIFFUSIONREG_MODELS"


def backendRoot() -> Path:
    """The folder that contains the ``diffusionreg`` package (goes on the worker's PYTHONPATH)."""
    override = os.environ.get(BACKEND_ROOT_ENV)
    candidates = ([Path(override)] if override else []) + [MODULE_DIR, MODULE_DIR.parent]
    for candidate in candidates:
        if (candidate / "diffusionreg" / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(
        "the diffusionreg backend package was not found next to the DiffusionRegCore module "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def extensionResourcePath(*parts: str) -> Path:
    """A file of the extension-wide ``Resources`` folder (Models.json, shipped models, samples)."""
    for root in (MODULE_DIR, MODULE_DIR.parent):
        candidate = root.joinpath("Resources", *parts)
        if candidate.exists():
            return candidate
    try:
        return backendRoot().joinpath("Resources", *parts)
    except FileNotFoundError:
        return MODULE_DIR.parent.joinpath("Resources", *parts)


def coreResourcePath(*parts: str) -> Path:
    """A file of DiffusionRegCore's own ``Resources`` folder (requirements.txt)."""
    return MODULE_DIR.joinpath("Resources", *parts)


def userDataDir() -> Path:
    """Per-user writable folder of the extension (models, settings); never the install tree."""
    base = os.environ.get("XDG_DATA_HOME") if os.name != "nt" else os.environ.get("LOCALAPPDATA")
    return Path(base) / "DiffusionReg" if base else Path.home() / ".diffusionreg"


def userModelsDir() -> Path:
    """Where imported and downloaded models live (``$DIFFUSIONREG_MODELS_DIR`` overrides)."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override) if override else userDataDir() / "models"


def modelsRegistryPath() -> Path:
    """The model registry the backend uses: ``$DIFFUSIONREG_MODELS`` or ``Resources/Models.json``."""
    override = os.environ.get(MODELS_REGISTRY_ENV)
    return Path(override) if override else extensionResourcePath("Models.json")
