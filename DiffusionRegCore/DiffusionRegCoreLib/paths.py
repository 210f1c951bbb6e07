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


def userModelsDir() -> Path:
    """Where imported and downloaded models live: the backend's per-user models folder
    (``$DIFFUSIONREG_MODELS_DIR`` overrides; see ``diffusionreg/registry.py``)."""
    return backendModule("registry").user_models_dir()


def modelsRegistryPath() -> Path:
    """The model registry the backend uses: ``$DIFFUSIONREG_MODELS`` or ``Resources/Models.json``."""
    return backendModule("registry").default_registry_path()


#: Backend modules that import only the standard library, so the Slicer side can use them
#: before the backend's dependencies (torch, ...) are installed.
TORCH_FREE_BACKEND_MODULES = ("registry", "vocabulary", "synth.manifest")


def backendModule(name: str):
    """A torch-free module of the backend package (``registry``, ``vocabulary``, ``synth.manifest``): the one the
    worker will run, i.e. from :func:`backendRoot`, loaded from its file when the ``diffusionreg``
    package there is not importable (a source checkout added only as Slicer module paths)."""
    import importlib
    import importlib.util
    import sys

    if name not in TORCH_FREE_BACKEND_MODULES:
        raise ValueError(f"{name} is not one of the torch-free backend modules {TORCH_FREE_BACKEND_MODULES}")
    source = backendRoot() / "diffusionreg" / (name.replace(".", "/") + ".py")
    try:
        module = importlib.import_module(f"diffusionreg.{name}")
        if Path(module.__file__).resolve() == source.resolve():
            return module
    except ImportError:
        pass
    key = f"_diffusionreg_bundled_{name.replace('.', '_')}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[key]
