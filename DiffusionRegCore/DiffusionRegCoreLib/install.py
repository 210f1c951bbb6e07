"""Install the backend's Python dependencies on first use (never at import or in setup()).

Policy:

- torch comes from the PyTorch extension (SlicerPyTorch's ``PyTorchUtils``), which picks a
  build that matches the NVIDIA driver; we never pip-install torch ourselves.
- Everything else comes from the pinned ``DiffusionRegCore/Resources/requirements.txt``
  with pip, in one go, after **one** confirmation that lists what will be installed.
- Slicer's own numpy, SimpleITK, vtk and requests (and the installed torch) are never
  replaced: pip runs with a constraints file pinning each of them to the installed version
  (and ``--upgrade-strategy only-if-needed``), so a requirement that would need another
  version makes pip fail instead of breaking Slicer.
- When a package that this Slicer session has already imported was changed, the user is
  asked to restart.

The planning functions at the top are pure (no Slicer) and unit-tested; the functions below
``# --- Slicer`` import ``slicer``/``qt`` lazily and only run inside the application.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Packages that belong to Slicer (or to PyTorchUtils): never installed, upgraded or replaced.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "vtk", "requests", "torch", "torchvision", "itk")
#: torch version the backend needs (passed to PyTorchUtils).
TORCH_REQUIREMENT = ">=2.1"

_NAME_PATTERN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalizeName(name: str) -> str:
    """PEP 503 normalised distribution name (``Foo_bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def readRequirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirementName(requirement: str) -> str:
    match = _NAME_PATTERN.match(requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return match.group(1)


def installedVersion(name: str) -> str | None:
    """Installed version of a distribution, without importing it (None when absent)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def isSatisfied(requirement: str, version: str | None) -> bool:
    """Whether an installed ``version`` meets ``requirement`` (markers that do not apply count as met)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion
    except ImportError:  # packaging ships with Slicer and pip; be lenient without it
        return version is not None
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    if version is None:
        return False
    try:
        return parsed.specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return False


@dataclass
class InstallPlan:
    """What first use has to install."""

    torchMissing: bool = False
    torchTooOld: str | None = None  # installed version when it does not meet TORCH_REQUIREMENT
    pipRequirements: list[str] = field(default_factory=list)  # lines from requirements.txt
    constraints: list[str] = field(default_factory=list)  # "numpy==1.26.4", ...

    @property
    def empty(self) -> bool:
        return not (self.torchMissing or self.pipRequirements)

    def describe(self) -> list[str]:
        """Human-readable list for the one confirmation dialog."""
        items = []
        if self.torchMissing:
            items.append(
                f"PyTorch {TORCH_REQUIREMENT} (through PyTorch Utils; a GPU build is chosen to match "
                "your NVIDIA driver; about 1 GB for CPU, 2-4 GB with CUDA)"
            )
        items += [f"{r} (pip)" for r in self.pipRequirements]
        return items


def planInstall(
    requirements: Iterable[str],
    versionOf: Callable[[str], str | None] = installedVersion,
    torchRequirement: str = TORCH_REQUIREMENT,
) -> InstallPlan:
    """Decide what is missing. Raises ValueError if a requirement names a protected package."""
    protected = {normalizeName(p) for p in PROTECTED_PACKAGES}
    plan = InstallPlan()
    torchVersion = versionOf("torch")
    plan.torchMissing = torchVersion is None
    if torchVersion is not None and not isSatisfied(f"torch{torchRequirement}", torchVersion):
        plan.torchTooOld = torchVersion
    for requirement in requirements:
        name = requirementName(requirement)
        if normalizeName(name) in protected:
            raise ValueError(f"requirements must not list {name}: it belongs to Slicer or to PyTorch Utils")
        if not isSatisfied(requirement, versionOf(name)):
            plan.pipRequirements.append(requirement)
    plan.constraints = constraintLines(versionOf)
    return plan


def constraintLines(versionOf: Callable[[str], str | None] = installedVersion) -> list[str]:
    """``name==version`` for every protected package that is installed (pip ``-c`` file)."""
    lines = []
    for name in PROTECTED_PACKAGES:
        version = versionOf(name)
        if version:
            lines.append(f"{name}=={version}")
    return lines


def pipInstallArguments(plan: InstallPlan, constraintsFile: str | os.PathLike | None) -> list[str]:
    """The list given to ``slicer.util.pip_install``: options and requirements, **without** ``install``.

    Slicer prepends ``install`` itself (5.10 ``util.pip_install``: ``args = "install", *requirements``;
    5.12 ``packaging._build_pip_args``: ``["install", *requirements]``), so a leading ``install``
    here would make pip try to install a package called "install". The constraints file goes
    in the list as ``-c FILE`` (5.10 has no ``constraints`` keyword), protected packages pinned.
    """
    arguments = ["--upgrade-strategy", "only-if-needed"]
    if constraintsFile:
        arguments += ["-c", str(constraintsFile)]
    return arguments + list(plan.pipRequirements)


def changedImportedPackages(
    before: dict[str, str | None], after: dict[str, str | None], importedModules: Iterable[str] | None = None
) -> list[str]:
    """Distributions whose version changed while already imported here (restart needed)."""
    imported = {m.split(".")[0].lower() for m in (importedModules if importedModules is not None else sys.modules)}
    changed = []
    for name, old in before.items():
        if old is not None and after.get(name) != old and _moduleName(name) in imported:
            changed.append(name)
    return changed


def _moduleName(distribution: str) -> str:
    return distribution.lower().replace("-", "_")


# --- Slicer ---------------------------------------------------------------------------------
class InstallError(RuntimeError):
    """Dependencies could not be installed; the message says what to do."""


def pyTorchUtilsLogic():
    """SlicerPyTorch's logic, or None when the PyTorch extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def readRequirementFiles(paths) -> list[str]:
    """Requirement lines of one file or of several (a module's list: the core's common file plus its own)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    lines: list[str] = []
    for path in paths:
        lines += [line for line in readRequirements(path) if line not in lines]
    return lines


def currentPlan(requirementsPaths) -> InstallPlan:
    """What is missing for the requirement file(s) ``requirementsPaths``."""
    return planInstall(readRequirementFiles(requirementsPaths))


def ensureDependencies(
    requirementsPath, requester: str = "DiffusionReg", askConfirmation: bool = True, log: Callable[[str], None] | None = None
) -> bool:
    """Install what is missing after one confirmation; True when everything is in place.

    ``requirementsPath``: one requirements file or a list of them (the module's own list).

    False when the user declined. Raises :class:`InstallError` when installation failed or
    the PyTorch extension is missing. Offers a restart when an imported package changed.
    """
    import slicer

    log = log or logging.info
    plan = currentPlan(requirementsPath)
    if plan.torchTooOld:
        log(
            f"PyTorch {plan.torchTooOld} is installed; {requester} needs torch{TORCH_REQUIREMENT}. "
            "Use the PyTorch Utils module to upgrade it."
        )
    if plan.empty:
        return True
    torchLogic = pyTorchUtilsLogic() if plan.torchMissing else None
    if plan.torchMissing and torchLogic is None:
        raise InstallError(
            f"{requester} needs PyTorch, which is installed through the PyTorch extension. "
            "Install 'PyTorch' from the Extensions Manager, restart Slicer and try again."
        )
    testing = bool(slicer.app.commandOptions().testingEnabled) if hasattr(slicer.app, "commandOptions") else False
    if askConfirmation and not testing:
        items = plan.describe()
        text = (
            f"{requester} needs these Python packages, which are not installed yet:\n\n"
            + "\n".join(f"  - {item}" for item in items)
            + "\n\nThey are downloaded and installed into Slicer's Python now; this can take several minutes. "
            "Slicer's own numpy, SimpleITK, vtk and requests are not changed.\n\nInstall now?"
        )
        if not slicer.util.confirmOkCancelDisplay(
            text, windowTitle=f"{requester}: install dependencies", detailedText="\n".join(items)
        ):
            log("Installation declined by the user.")
            return False
    before = {name: installedVersion(name) for name in [requirementName(r) for r in plan.pipRequirements]}
    if plan.torchMissing:
        log("Installing PyTorch through PyTorch Utils...")
        try:
            torch = _installTorch(torchLogic)
        except Exception as error:  # any failure of PyTorch Utils: shown to the user with what to do
            raise InstallError(f"PyTorch installation failed: {error}. Try the PyTorch Utils module.") from error
        if torch is None:
            raise InstallError("PyTorch was not installed. Install it from the PyTorch Utils module and try again.")
        log(f"PyTorch {installedVersion('torch')} installed.")
    if plan.pipRequirements:
        # Re-plan: torch may have brought some requirements, and pins must include the new torch.
        plan = currentPlan(requirementsPath)
    if plan.pipRequirements:
        with tempfile.TemporaryDirectory(prefix="DiffusionReg-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text("\n".join(plan.constraints) + "\n", encoding="utf-8")
            arguments = pipInstallArguments(plan, constraints)
            log("pip " + " ".join(arguments))
            try:
                slicer.util.pip_install(arguments)
            except Exception as error:  # pip failed (CalledProcessError) or could not start
                raise InstallError(
                    f"pip could not install {', '.join(plan.pipRequirements)}: {error}. "
                    "Restart Slicer and try again; the Python console shows pip's full log."
                ) from error
    remaining = currentPlan(requirementsPath)
    if remaining.pipRequirements or remaining.torchMissing:
        raise InstallError("still missing after installation: " + ", ".join(remaining.describe()))
    after = {name: installedVersion(name) for name in before}
    changed = changedImportedPackages(before, after)
    if changed and slicer.util.confirmYesNoDisplay(
        f"{', '.join(changed)} changed while in use. Restart Slicer now to use the new version?",
        windowTitle=f"{requester}: restart needed",
    ):
        slicer.util.restart()
    return True


def _installTorch(torchLogic):
    try:
        return torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
    except TypeError:  # older PyTorchUtils without the version argument
        return torchLogic.installTorch(askConfirmation=False)
