"""Checks of the Slicer modules that run outside Slicer (no GUI, no slicer-core needed).

- every module file compiles; every ``.ui`` parses; every ``self.ui.NAME`` the code uses
  exists in its ``.ui``; every ``SlicerParameterName`` is a parameter-node field of a type
  the bound widget can show;
- the CMake lists name exactly the scripts and resources on disk; the top-level CMakeLists has
  the extension metadata; the backend package and Resources are installed with the extension;
- ``DiffusionRegCoreLib`` keeps Qt and ``slicer.util`` out, and the module files import nothing
  heavy (torch, the backend) at load time;
- the pure parts of ``DiffusionRegCoreLib`` (progress lines, command lines, the process runner
  with cancel, the device probe, the model manager, the dependency plan) behave.
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("DiffusionRegCore", "SpatialDiffusionReg", "SynthPairs", "MidlineShift")
#: Modules that ship a sample pair (``SAMPLE = SamplePair(...)`` with ``SAMPLE_SHA256`` constants).
SAMPLE_MODULES = ("SpatialDiffusionReg", "SynthPairs", "MidlineShift")
CORE = REPO / "DiffusionRegCore"
if str(CORE) not in sys.path:
    sys.path.insert(0, str(CORE))

from DiffusionRegCoreLib import (
    command,
    device,
    install,
    job,
    model_choice,
    models,
    paths,
    process,
    progress,
)

HEAVY_MODULES = {"torch", "monai", "diffusionreg", "numpy.testing", "SimpleITK", "nibabel", "scipy"}


def _module_python_files(module: str) -> list[Path]:
    root = REPO / module
    return sorted(p for p in root.rglob("*.py") if "Testing" not in p.relative_to(root).parts)


def _ui_files(module: str) -> list[Path]:
    return sorted((REPO / module / "Resources" / "UI").glob("*.ui"))


# --- files parse ------------------------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_module_files_compile(module: str, tmp_path: Path) -> None:
    files = _module_python_files(module)
    assert (REPO / module / f"{module}.py") in files
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


@pytest.mark.parametrize("module", [m for m in MODULES if _ui_files(m)])
def test_ui_files_parse_and_have_a_mrml_widget_root(module: str) -> None:
    for path in _ui_files(module):
        root = ET.parse(path).getroot()
        assert root.tag == "ui"
        top = root.find("widget")
        assert top is not None and top.get("class") == "qMRMLWidget", f"{path.name}: root widget must be qMRMLWidget"
        assert root.findtext("class") == top.get("name")
        names = [w.get("name") for w in root.iter("widget")]
        assert len(names) == len(set(names)), f"{path.name}: duplicate widget names"
        declared = {c.findtext("class") for c in root.iter("customwidget")}
        used = {w.get("class") for w in root.iter("widget")}
        custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
        assert custom <= declared, f"{path.name}: custom widgets not declared: {custom - declared}"


def _ui_names(path: Path) -> set[str]:
    root = ET.parse(path).getroot()
    return {e.get("name") for e in root.iter() if e.tag in ("widget", "layout", "spacer", "action") and e.get("name")}


@pytest.mark.parametrize("module", [m for m in MODULES if _ui_files(m)])
def test_every_ui_name_used_in_code_exists(module: str) -> None:
    """Names the module file uses, and those the kit's JobModuleWidget uses for a module derived from it."""
    code = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
    if _derives_from_kit_widget(module):
        code += _kit_widget_source()
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", code))
    assert used, "the module uses no widgets?"
    available = set().union(*(_ui_names(p) for p in _ui_files(module)))
    assert not used - available, f"widgets used in {module}.py but missing from its .ui: {sorted(used - available)}"


def _kit_widget_source() -> str:
    tree = ast.parse((CORE / "DiffusionRegCore.py").read_text(encoding="utf-8"))
    return ast.unparse(next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "JobModuleWidget"))


def _derives_from_kit_widget(module: str) -> bool:
    tree = ast.parse((REPO / module / f"{module}.py").read_text(encoding="utf-8"))
    widget = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Widget"), None)
    return widget is not None and [ast.unparse(b) for b in widget.bases] == ["JobModuleWidget"]


def _parameter_fields(path: Path) -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class in a module file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
            or (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "parameterNodeWrapper")
            for d in node.decorator_list
        ):
            return {
                s.target.id: ast.unparse(s.annotation)
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    return {}


@pytest.mark.parametrize("module", [m for m in MODULES if _ui_files(m)])
def test_parameter_names_in_ui_are_fields_of_a_matching_type(module: str) -> None:
    fields = _parameter_fields(REPO / module / f"{module}.py")
    assert fields, f"{module}.py has no @parameterNodeWrapper class"
    expected = {
        "qMRMLNodeComboBox": lambda a: a.startswith("vtkMRML"),
        "QComboBox": lambda a: "Choice(" in a,  # the string connector needs Choice
        "QSpinBox": lambda a: a == "int" or a.startswith("Annotated[int"),
        "QCheckBox": lambda a: a == "bool",
        "QDoubleSpinBox": lambda a: a == "float" or a.startswith("Annotated[float"),
        "ctkSliderWidget": lambda a: "WithinRange" in a and "float" in a,
        "QLineEdit": lambda a: a == "str",
    }
    for path in _ui_files(module):
        for widget in ET.parse(path).getroot().iter("widget"):
            for prop in widget.findall("property"):
                if prop.get("name") != "SlicerParameterName":
                    continue
                parameter = prop.findtext("string")
                assert parameter in fields, f"{widget.get('name')}: parameter {parameter!r} is not a field"
                check = expected.get(widget.get("class"))
                assert check is not None, f"{widget.get('class')} has no parameterNodeWrapper connector here"
                assert check(fields[parameter]), f"{widget.get('name')} ({widget.get('class')}) cannot show {fields[parameter]}"


# --- CMake --------------------------------------------------------------------------------------
def _cmake_list(text: str, variable: str, module: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", text, re.DOTALL)
    assert match, f"{variable} not set"
    items = [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]
    return [i.replace("${MODULE_NAME}", module) for i in items if i]


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_script_and_resource(module: str) -> None:
    root = REPO / module
    text = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"set\(\s*MODULE_NAME\s+{module}\s*\)", text)
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS", module)
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES", module)
    on_disk_scripts = {p.relative_to(root).as_posix() for p in _module_python_files(module)}
    on_disk_resources = {
        p.relative_to(root).as_posix() for p in (root / "Resources").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert set(scripts) == on_disk_scripts, (
        f"scripts: listed-not-found {set(scripts) - on_disk_scripts}, unlisted {on_disk_scripts - set(scripts)}"
    )
    assert set(resources) == on_disk_resources, (
        f"resources: listed-not-found {set(resources) - on_disk_resources}, unlisted {on_disk_resources - set(resources)}"
    )
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.DOTALL)
    assert call, "slicerMacroBuildScriptedModule missing"
    for keyword in (
        "NAME ${MODULE_NAME}",
        "SCRIPTS ${MODULE_PYTHON_SCRIPTS}",
        "RESOURCES ${MODULE_PYTHON_RESOURCES}",
        "WITH_GENERIC_TESTS",
    ):
        assert keyword in call.group(1)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (root / "Testing" / "CMakeLists.txt").is_file() and (root / "Testing" / "Python" / "CMakeLists.txt").is_file()
    assert f"Resources/Icons/{module}.png" in resources


REPOSITORY_URL = "https://github.com/diffusionreg/SlicerDiffusionReg"
RAW_PREFIX = "https://raw.githubusercontent.com/diffusionreg/SlicerDiffusionReg/main/"


def test_top_level_cmake_is_an_extension_with_every_module() -> None:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION [\d.]+", text)
    assert re.search(r"^project\(DiffusionReg\)", text, re.M)
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf"set\({variable} \S", text), f"{variable} not set"
    assert re.search(r'set\(EXTENSION_CATEGORY "Registration"\)', text)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})") < text.index("include(${Slicer_EXTENSION_CPACK})")
    subdirs = re.findall(r"^add_subdirectory\((\w+)\)", text, re.M)
    module_dirs = sorted(p.parent.name for p in REPO.glob("*/CMakeLists.txt") if (p.parent / f"{p.parent.name}.py").is_file())
    assert sorted(subdirs) == module_dirs
    assert subdirs[0] == "DiffusionRegCore", "the shared module comes first"
    icon = REPO / "Resources" / "Icons" / "DiffusionReg.png"
    assert icon.is_file() and text.count("Resources/Icons/DiffusionReg.png") == 1
    assert _png_size(icon) == (128, 128)


def test_extension_can_be_listed_in_the_extensions_index() -> None:
    """Issue 10 item 4, checked the way ExtensionsIndex's scripts/check_description_files.py checks:
    the JSON entry (schema v1.0.2 keys), the repository name, project() = file name, literal http(s)
    icon and screenshot URLs read with the validator's regular expressions, pointing at files of
    this repository; contributors as "Name (Organisation)"; a licence file."""
    entry = json.loads((REPO / "DiffusionReg.json").read_text(encoding="utf-8"))
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "dicom_support_rule",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v"
    )
    assert entry["scm_url"] == REPOSITORY_URL and "slicer" in entry["scm_url"].rsplit("/", 1)[1].lower()
    assert entry["category"] == "Registration" and isinstance(entry["tier"], int)
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", text, re.I | re.M)[0] == "DiffusionReg"
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    assert entry["build_dependencies"] == depends
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text, re.I | re.M)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.I | re.M)
    assert icons and shots
    for url in [icons[0], *shots[0].split()]:
        assert url.startswith(RAW_PREFIX), url
        path = REPO / url[len(RAW_PREFIX) :]
        assert path.is_file() and path.suffix == ".png" and _png_size(path)[0] >= 128, url
    assert re.search(rf'set\(EXTENSION_HOMEPAGE "{re.escape(REPOSITORY_URL)}', text)
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', text).group(1)
    assert re.fullmatch(r"[^(),]+ \([^()]+\)(, [^(),]+ \([^()]+\))*", contributors), contributors
    assert (REPO / "LICENSE").is_file()
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', text).group(1)
    assert "Slicer 5.10" in description and "OCT" not in description, "claim only what works"


def test_docs_name_the_slicer_versions_and_show_existing_images() -> None:
    doc = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    assert "5.10" in doc and "5.8" in doc and "3.9" in doc
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc):
        assert (REPO / "docs" / target).resolve().is_file(), target


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_backend_and_extension_resources_are_installed_with_the_extension() -> None:
    text = (CORE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "ctkMacroCompilePythonScript(" in text and "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text and "NO_INSTALL_SUBDIR" in text
    patterns = re.findall(r"\$\{PROJECT_SOURCE_DIR\}/(\S+)", text)
    globbed = set()
    for pattern in patterns:
        if "*" in pattern or (REPO / pattern).exists():
            globbed |= {p.relative_to(REPO).as_posix() for p in REPO.glob(pattern.replace("*.py", "**/*.py")) if p.is_file()}
    backend = {p.relative_to(REPO).as_posix() for p in (REPO / "diffusionreg").rglob("*.py")}
    assert backend and backend <= globbed, f"backend files not installed: {sorted(backend - globbed)[:5]}"
    for needed in (
        "Resources/Sample/sample_fixed.nii.gz",
        "Resources/Sample/sample_moving.nii.gz",
        "Resources/Sample/lung_vessels_fixed.nii.gz",
        "Resources/Sample/lung_vessels_moving.nii.gz",
    ):
        if (REPO / needed).exists():
            assert needed in globbed
    assert "Resources/Models.json" in text


# --- imports ------------------------------------------------------------------------------------
def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Try):
            for inner in node.body:
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    names.add(inner.module)
    return names


def test_core_lib_keeps_qt_and_slicer_util_out() -> None:
    for path in sorted((CORE / "DiffusionRegCoreLib").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        imports = _top_level_imports(path)
        assert not {i for i in imports if i.split(".")[0] in ("qt", "ctk", "PythonQt")}, f"{path.name} imports Qt"
        assert "slicer.util" not in imports and "import slicer\n" not in source.split("# --- Slicer")[0], path.name
        slicer_names = {i for i in imports if i.startswith("slicer.")}
        assert all(re.fullmatch(r"slicer\.vtk\w+", n) for n in slicer_names), f"{path.name}: {slicer_names}"
        assert not {i for i in imports if i.split(".")[0] in HEAVY_MODULES - {"numpy.testing"}}, (
            f"{path.name} imports heavy modules"
        )


@pytest.mark.parametrize("module", MODULES)
def test_module_files_import_nothing_heavy_at_load(module: str) -> None:
    imports = _top_level_imports(REPO / module / f"{module}.py")
    heavy = {i for i in imports if i.split(".")[0] in HEAVY_MODULES}
    assert not heavy, f"{module}.py imports {heavy} when Slicer loads it"


def test_pure_lib_imports_without_slicer_or_qt() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(CORE)!r})
        from DiffusionRegCoreLib import command, device, install, models, paths, process, progress
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'ctk', 'torch', 'vtk'))
        print(bad)
        sys.exit(1 if bad else 0)
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr


REQUIREMENT_FILES = sorted((CORE / "Resources").glob("requirements*.txt"))
#: import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"SimpleITK": "SimpleITK"}


def _backend_third_party_imports(paths) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] not in stdlib | {"diffusionreg"}}
    return found


def test_requirements_are_pinned_and_leave_slicer_packages_alone() -> None:
    assert [p.name for p in REQUIREMENT_FILES] == ["requirements-deformable.txt", "requirements.txt"]
    protected = {install.normalizeName(p) for p in install.PROTECTED_PACKAGES}
    listed = set()
    for path in REQUIREMENT_FILES:
        lines = install.readRequirements(path)
        assert lines, path.name
        for line in lines:
            name = install.normalizeName(install.requirementName(line))
            assert name not in protected, f"{line} would replace a package Slicer (or PyTorch Utils) owns"
            assert "<" in line and ">=" in line, f"{line} must have a lower and an upper bound"
            listed.add(name)
    imported = {
        install.normalizeName(DISTRIBUTION_OF.get(n, n))
        for n in _backend_third_party_imports((REPO / "diffusionreg").rglob("*.py"))
    }
    assert imported - protected <= listed, f"backend imports missing from the requirement files: {imported - protected - listed}"
    assert install.readRequirementFiles(REQUIREMENT_FILES[::-1]) == install.readRequirements(
        REQUIREMENT_FILES[1]
    ) + install.readRequirements(REQUIREMENT_FILES[0])


def test_the_affine_path_runs_without_the_deformable_requirements() -> None:
    """SpatialDiffusionReg installs only requirements.txt: its backend path must not need MONAI."""
    pytest.importorskip("torch", reason="the affine command imports torch")
    extra = {install.requirementName(l) for l in install.readRequirements(CORE / "Resources" / "requirements-deformable.txt")}
    code = textwrap.dedent(
        f"""
        import sys
        for name in {sorted(extra)!r}:
            sys.modules[name] = None  # importing it now raises ImportError
        import diffusionreg.affine.commands, diffusionreg.affine.register, diffusionreg.cli
        from diffusionreg.cli import build_parser
        build_parser().parse_args(["affine", "--fixed", "f", "--moving", "m", "--output-transform", "t.h5"])
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert completed.returncode == 0, completed.stderr


# --- DiffusionRegCoreLib: progress and commands -------------------------------------------------------
def test_progress_lines_parse_and_log_lines_do_not() -> None:
    event = progress.parseProgressLine('{"stage": "reverse diffusion", "fraction": 0.25, "message": "step 4/16"}')
    assert event == progress.ProgressEvent("reverse diffusion", 0.25, "step 4/16")
    assert event.text() == "reverse diffusion 25%: step 4/16"
    assert progress.parseProgressLine('{"stage": "x", "fraction": 7}').fraction == 1.0
    assert progress.parseProgressLine('{"stage": "x", "fraction": -1, "message": 3}') == progress.ProgressEvent("x", 0.0, "3")
    for line in (
        "wrote t.h5",
        "{not json}",
        '{"stage": 1, "fraction": 0.5}',
        '{"fraction": 0.5}',
        '{"stage": "s", "fraction": true}',
        "[1, 2]",
        "",
    ):
        assert progress.parseProgressLine(line) is None, line
    assert progress.parseErrorLine("error: moving image not found: m.nrrd") == "moving image not found: m.nrrd"
    assert progress.parseErrorLine("no error here") is None
    assert progress.describeExitCode(2) == "bad input" and progress.describeExitCode(130) == "cancelled"


def test_backend_environment_puts_the_backend_first() -> None:
    env = command.backendEnvironment("/opt/ext", base={"PYTHONPATH": "/a" + os.pathsep + "/opt/ext"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/opt/ext", "/a"] and env["PYTHONUNBUFFERED"] == "1"
    assert command.backendCommand("py", ["affine"], ["--x", "1"]) == [
        "py",
        "-m",
        "diffusionreg",
        "affine",
        "--x",
        "1",
        "--progress",
        "json",
    ]


def test_python_slicer_missing_is_a_clear_error_in_slicer(tmp_path: Path, monkeypatch) -> None:
    """Issue 10 item 6: in Slicer, sys.executable is the Slicer application; never run that."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(command.PythonSlicerNotFound, match="PythonSlicer was not found .*Reinstall 3D Slicer"):
        command.pythonExecutable(tmp_path / "Slicer-5.10", inSlicer=True)
    assert command.pythonExecutable(tmp_path / "Slicer-5.10") == sys.executable  # scripts and tests
    launcher = tmp_path / "Slicer-5.10" / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    launcher.parent.mkdir(parents=True)
    launcher.write_text("")
    assert command.pythonExecutable(tmp_path / "Slicer-5.10", inSlicer=True) == str(launcher)


def test_one_weighted_progress_bar_over_all_stages() -> None:
    """Issue 10 item 5: the bar never restarts per stage; elapsed and remaining time are shown."""
    now = [100.0]
    overall = progress.OverallProgress({"read": 1, "affine": 6, "refine": 2, "write": 1}, clock=lambda: now[0])
    seen = []
    for stage, fraction, at in (
        ("read", 0.0, 100.0),
        ("read", 1.0, 101.0),
        ("affine", 0.5, 104.0),
        ("affine", 1.0, 107.0),
        ("unknown", 0.3, 107.5),
        ("write", 0.0, 108.0),
        ("write", 1.0, 109.0),
    ):
        now[0] = at
        seen.append(overall.update(progress.ProgressEvent(stage, fraction, "")))
    fractions = [s.fraction for s in seen]
    assert fractions == sorted(fractions), "the bar went backwards"
    assert fractions[1] == pytest.approx(0.1) and fractions[3] == pytest.approx(0.7)
    assert fractions[5] == pytest.approx(0.9), "the skipped 'refine' stage counts as done once 'write' starts"
    assert fractions[-1] == pytest.approx(1.0) and seen[4].stage == "unknown" and fractions[4] == fractions[3]
    assert seen[0].remainingSeconds is None
    assert seen[2].remainingSeconds == pytest.approx(4.0 * (1 - 0.4) / 0.4)
    assert seen[2].text() == "affine - 0:04 elapsed, about 0:06 left"
    assert progress.formatSeconds(3725) == "1:02:05"
    with pytest.raises(ValueError):
        progress.OverallProgress({})


def test_paths_find_the_backend_and_resources() -> None:
    assert paths.backendRoot() == REPO
    assert paths.coreResourcePath("requirements.txt").is_file()
    assert paths.extensionResourcePath("Sample", "sample_fixed.nii.gz") == REPO / "Resources" / "Sample" / "sample_fixed.nii.gz"


# --- process runner --------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, sys, time
    print("hello log", flush=True)
    for i in range(3):
        print(json.dumps({"stage": "work", "fraction": (i + 1) / 3, "message": f"{i + 1}/3"}), flush=True)
    print("warning on stderr", file=sys.stderr, flush=True)
    code = int(sys.argv[1])
    if code == 2:
        print("error: fixed image not found: x.nrrd", file=sys.stderr, flush=True)
    sys.exit(code)
    """
)


@pytest.mark.parametrize("code", [0, 2])
def test_process_runner_reports_progress_log_and_errors(code: int) -> None:
    events, lines, finished = [], [], []
    runner = process.BackendProcess(
        [sys.executable, "-c", WORKER, str(code)],
        onProgress=events.append,
        onLog=lambda line, stream: lines.append((stream, line)),
        onFinished=finished.append,
    )
    result = runner.start().wait(timeout=60)
    assert [e.fraction for e in events] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert ("stdout", "hello log") in lines and ("stderr", "warning on stderr") in lines
    assert not any("fraction" in line for _, line in lines)
    assert finished == [runner] and not runner.running
    assert result.returncode == code and result.succeeded == (code == 0) and not result.cancelled
    if code == 2:
        assert result.error == "fixed image not found: x.nrrd"
        assert result.summary() == "bad input: fixed image not found: x.nrrd"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie waiting for its (foreign) parent counts as dead
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_cancel_ends_the_whole_process_tree(ignore_sigterm: bool) -> None:
    """Like PythonSlicer -> python-real: the worker runs in a child of the launched process."""
    child = (
        "import signal, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
        + "time.sleep(120)"
    )
    launcher = textwrap.dedent(
        f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", {child!r}])
        print("child", worker.pid, flush=True)
        worker.wait()
        """
    )
    lines = []
    runner = process.BackendProcess([sys.executable, "-c", launcher], onLog=lambda line, stream: lines.append(line)).start()
    deadline = time.monotonic() + 30
    while not any(l.startswith("child ") for l in lines) and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.05)
    childPid = int(next(l for l in lines if l.startswith("child ")).split()[1])
    assert _alive(childPid)
    runner.cancel(grace=0.5)
    result = runner.wait(timeout=30)
    assert result.cancelled and not result.succeeded and result.summary() == "cancelled by the user"
    deadline = time.monotonic() + 10
    while _alive(childPid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(childPid), "the grandchild (the real worker) survived Cancel"


ESCAPING_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    # A descendant that leaves the process group and inherits our stdout (keeps the pipe open).
    escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    print("escaped", escaped.pid, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(60)
    """
)


def _start_escaping(mode: str):
    lines = []
    runner = process.BackendProcess(
        [sys.executable, "-c", ESCAPING_LAUNCHER, mode], onLog=lambda line, stream: lines.append(line)
    ).start()
    deadline = time.monotonic() + 30
    while not any(l.startswith("escaped ") for l in lines) and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.05)
    return runner, int(next(l for l in lines if l.startswith("escaped ")).split()[1])


def _end(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(os.name == "nt", reason="POSIX sessions")
def test_task_ends_when_its_direct_child_exits_even_if_a_descendant_holds_the_pipe(monkeypatch) -> None:
    """Issue 9 item 16, without psutil: the run finishes once the direct child has exited."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    runner, escaped = _start_escaping("exit")
    try:
        start = time.monotonic()
        result = runner.wait(timeout=20)
        assert time.monotonic() - start < process.DRAIN_SECONDS + 5
        assert result.returncode == 0 and not runner.running
        assert _alive(escaped), "the test needs a descendant that still holds the pipe"
    finally:
        _end(escaped)


@pytest.mark.skipif(os.name == "nt", reason="POSIX sessions")
@pytest.mark.parametrize("proc_fallback", [True, False])
def test_cancel_without_psutil_finishes_and_wait_keeps_its_timeout(monkeypatch, proc_fallback: bool) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)
    if not proc_fallback:  # a POSIX system without /proc: only the direct child can be found
        monkeypatch.setattr(process, "_procDescendants", lambda pid, procRoot="/proc": [])
    runner, escaped = _start_escaping("wait")
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            runner.wait(timeout=1.0)
        assert time.monotonic() - start < 1.0 + 1.0 + process.DRAIN_SECONDS + 3, "wait(timeout) overran"
        assert not runner.running and runner.result().cancelled
        if proc_fallback and os.path.isdir("/proc"):
            deadline = time.monotonic() + 10
            while _alive(escaped) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(escaped), "/proc fallback should have found and ended the escaped descendant"
    finally:
        _end(escaped)


def test_work_folder_is_removed_unless_kept(tmp_path: Path) -> None:
    folder = process.WorkFolder(tmp_path / "parent")
    folder.file("a.txt").write_text("x")
    assert folder.cleanup(keep=True) is False and folder.path.exists()
    assert folder.cleanup() is True and not folder.path.exists()


def test_chained_jobs_run_in_turn_with_one_progress_and_stop_at_the_first_failure(tmp_path: Path) -> None:
    """``PreparedJob.then``: the next step is prepared from the previous one's outputs and runs only
    when it completed; its progress stages keep apart through ``stagePrefix``."""

    def step(name: str, code: str, prefix: str = "", then=None) -> job.PreparedJob:
        emit = f"print(json.dumps({{'stage': 'read', 'fraction': 1.0, 'message': {name!r}}}), flush=True)"
        command_line = [sys.executable, "-c", f"import json, sys; {emit}; {code}"]
        return job.PreparedJob(
            name, command_line, process.WorkFolder(tmp_path), lambda result: name, stagePrefix=prefix, then=then
        )

    prepared: list[str] = []

    def second(outputs):
        prepared.append(outputs)
        return step("second", "pass")

    first = step("first", "pass", "first: ", second)
    first.stageWeights = {
        **job.stageWeightsOfStep({"read": 1.0}, "first: ", 0.25),
        **job.stageWeightsOfStep({"read": 3.0}, "", 0.75),
    }
    assert first.stageWeights == {"first: read": 0.25, "read": 0.75}
    events = []
    outcome = job.runJob(first, timeout=60, onProgress=events.append)
    assert (outcome.state, outcome.outputs, prepared) == ("completed", "second", ["first"])
    assert [e.stage for e in events] == ["first: read", "read"]
    overall = progress.OverallProgress(first.stageWeights)
    assert [round(overall.update(e).fraction, 6) for e in events] == [0.25, 1.0]

    prepared.clear()
    failed = job.runJob(step("first", "sys.exit(2)", then=second), timeout=60)
    assert failed.state == "failed" and prepared == [], "a failed step does not start the next one"

    def broken(outputs):
        raise ValueError("the affine result is not linear")

    logged: list[str] = []
    outcome = job.runJob(step("first", "pass", then=broken), timeout=60, onLog=logged.append)
    assert outcome.state == "failed" and outcome.error == "could not start the next step: the affine result is not linear"
    assert outcome.error in logged


# --- device probe ---------------------------------------------------------------------------------------
def test_device_probe_parsing_and_choices() -> None:
    record = {
        "torch": "2.5.1+cu124",
        "cuda_built": True,
        "cuda_available": True,
        "cuda_version": "12.4",
        "devices": [
            {"index": 0, "name": "RTX 4090", "total_memory_gb": 23.6},
            {"index": 1, "name": "T400", "total_memory_gb": 1.9},
        ],
    }
    info = device.parseProbeOutput("some warning\n" + device.PROBE_MARKER + json.dumps(record) + "\n")
    assert info.torchInstalled and [g.name for g in info.gpus] == ["RTX 4090", "T400"]
    assert [v for _, v in device.deviceChoices(info)] == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert "GPU 0: RTX 4090, 23.6 GB" in info.summary()
    assert any("1.9 GB" in w for w in device.deviceWarnings(info, "cuda:1"))
    assert not device.deviceWarnings(info, "cuda:0")
    broken = device.parseProbeOutput(
        device.PROBE_MARKER + json.dumps({"torch": "2.3", "cuda_built": True, "cuda_available": False})
    )
    assert any("built with CUDA" in w for w in device.deviceWarnings(broken, "auto"))
    missing = device.parseProbeOutput("Traceback ...\nImportError: x")
    assert missing.error and not missing.torchInstalled
    assert device.deviceChoices(None) == [("Auto (GPU if available)", "auto"), ("CPU", "cpu")]


def test_device_probe_runs_in_a_subprocess() -> None:
    """The probe script itself, with this interpreter (torch CPU here)."""
    completed = subprocess.run(device.probeCommand(sys.executable), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    info = device.parseProbeOutput(completed.stdout)
    assert info.error is None, info.error
    try:
        from importlib import metadata

        expected = metadata.version("torch")
    except Exception:
        expected = None
    assert (info.torch is None) == (expected is None)
    if expected is not None:
        assert info.torch.split("+")[0] == expected.split("+")[0]


# --- model manager -----------------------------------------------------------------------------------------
def test_model_manager_lists_imports_and_verifies(tmp_path: Path) -> None:
    resources = tmp_path / "Resources"
    (resources / "Models" / "shipped").mkdir(parents=True)
    weights = resources / "Models" / "shipped" / "model.safetensors"
    weights.write_bytes(b"weights")
    (resources / "Models.json").write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "shipped",
                        "task": "affine",
                        "modality": "mri",
                        "file": "Models/shipped/model.safetensors",
                        "sha256": models.sha256File(weights),
                        "config": "Models/shipped/config.json",
                    },
                    {
                        "name": "remote",
                        "task": "affine",
                        "modality": "ct",
                        "url": "https://example.org/remote.safetensors",
                        "sha256": "0" * 64,
                        "config": "Models/remote/config.json",
                    },
                    {
                        "name": "deform",
                        "task": "deformable",
                        "modality": "mri",
                        "file": "Models/d.safetensors",
                        "sha256": "0" * 64,
                        "config": "Models/d.json",
                    },
                ]
            }
        )
    )
    manager = models.ModelManager(resources / "Models.json", tmp_path / "user")
    assert [e.name for e in manager.models("affine")] == ["shipped", "remote"]
    assert [e.name for e in manager.models("affine", "MRI")] == ["shipped"]
    shipped = manager.find("shipped")
    assert shipped.available and shipped.modelArgument() == "shipped"
    assert manager.verify(shipped).status == "ok"
    assert manager.verify(manager.find("remote")).status == "not downloaded"
    assert [e.state for e in manager.models()] == ["installed", "downloadable", "missing"]
    assert manager.verify(manager.find("deform")).status == "missing"

    outside = tmp_path / "downloads"
    outside.mkdir()
    (outside / "mine.safetensors").write_bytes(b"my weights")
    (outside / "config.json").write_text("{}")
    entry = manager.importFile(outside / "mine.safetensors", task="affine")
    assert entry.source == "imported" and Path(entry.path).is_file()
    assert (Path(entry.path).parent / "config.json").is_file(), "the backend expects config.json beside the weights"
    assert entry.modelArgument() == entry.path and entry.sha256 == models.sha256File(outside / "mine.safetensors")
    again = manager.importFile(outside / "mine.safetensors")
    assert again.name != entry.name
    assert {e.name for e in manager.models("affine")} >= {"shipped", "remote", entry.name, again.name}
    assert manager.verify(entry).status == "ok"
    Path(entry.path).write_bytes(b"tampered")
    assert manager.verify(entry).status == "mismatch"
    with pytest.raises(ValueError, match="does not match"):
        manager.importFile(outside / "mine.safetensors", expectedSha256="f" * 64)
    with pytest.raises(ValueError, match="must be"):
        manager.importFile(outside / "config.json")
    assert manager.removeImported(again.name) and again.name not in {e.name for e in manager.models()}


def test_model_manager_reads_the_repository_registry() -> None:
    registry = REPO / "Resources" / "Models.json"
    manager = models.ModelManager(registry, REPO / "no-user-models")
    entries = manager.models()
    if registry.exists():
        for entry in entries:
            assert entry.task and entry.path
            if not entry.isRemote:
                assert manager.verify(entry).status == "ok", manager.verify(entry).text()
    else:
        assert entries == []


def test_panel_offers_only_modalities_of_installed_models_and_names_the_model(tmp_path: Path) -> None:
    """Issue 10 item 3: a modality is offered only when an installed model supports it."""
    root = tmp_path / "Resources"
    (root / "Models" / "brain").mkdir(parents=True)
    (root / "Models" / "brain" / "model.safetensors").write_bytes(b"w")
    (root / "Models" / "lung").mkdir(parents=True)
    (root / "Models" / "lung" / "model.safetensors").write_bytes(b"w")
    sha = "0" * 64
    (root / "Models.json").write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "ct-big",
                        "task": "affine",
                        "modality": "ct",
                        "url": "https://example.org/ct.safetensors",
                        "sha256": sha,
                        "config": "c.json",
                    },
                    {
                        "name": "brain",
                        "task": "affine",
                        "modality": "mri",
                        "file": "Models/brain/model.safetensors",
                        "sha256": sha,
                        "config": "c.json",
                    },
                    {
                        "name": "generic",
                        "task": "affine",
                        "modality": "any",
                        "url": "https://example.org/g.safetensors",
                        "sha256": sha,
                        "config": "c.json",
                    },
                    {
                        "name": "lung",
                        "task": "deformable",
                        "modality": "lung-vessels",
                        "file": "Models/lung/model.safetensors",
                        "sha256": sha,
                        "config": "c.json",
                    },
                ]
            }
        )
    )
    entries = models.ModelManager(root / "Models.json", tmp_path / "user").models()
    assert model_choice.installedModalities(entries, "affine") == ["mri"]
    assert model_choice.installedModalities(entries, "deformable") == ["lung-vessels"]
    entry, reason = model_choice.modelToRun(entries, "affine", "mri")
    assert entry.name == "brain" and reason == "" and model_choice.describeModel(entry) == "Runs 'brain' (affine, MRI; registry)"
    entry, reason = model_choice.modelToRun(entries, "affine", "ct")
    assert entry is None and reason == "The model 'ct-big' is not downloaded yet (Download it under Models)"
    assert model_choice.modelToRun(entries, "affine", "oct") == (
        None,
        "The model 'generic' is not downloaded yet (Download it under Models)",
    )
    assert model_choice.modelToRun(entries, "affine", "ct", "brain")[1] == "The model 'brain' is for MRI, not CT"
    assert model_choice.modelToRun(entries, "affine", "mri", "nope")[1] == "The model 'nope' is not installed"
    assert model_choice.modalityLabel("octa") == "OCTA"
    assert [e.state for e in entries] == ["downloadable", "installed", "downloadable", "installed"]


def test_panel_names_the_model_the_backend_runs() -> None:
    """The panel's 'which model will run' is the backend's own choice (diffusionreg.models.resolve)."""
    pytest.importorskip("torch", reason="diffusionreg.models is part of the torch backend")
    from diffusionreg.models import resolve

    entries = models.ModelManager(paths.modelsRegistryPath(), REPO / "no-user-models").models()
    for task in ("affine", "deformable"):
        modalities = model_choice.installedModalities(entries, task)
        assert modalities, f"no installed {task} model in the repository"
        for modality in modalities:
            assert model_choice.defaultModel(entries, task, modality).name == resolve(None, task, modality).name


# --- dependency plan ----------------------------------------------------------------------------------------
def test_install_plan_installs_only_what_is_missing_and_pins_slicer_packages() -> None:
    installed = {
        "numpy": "1.26.4",
        "SimpleITK": "2.4.0",
        "requests": "2.32.0",
        "vtk": "9.3.0",
        "scipy": "1.13.0",
        "tqdm": "4.66.0",
    }
    plan = install.planInstall(
        ["monai>=1.3,<1.7", "scipy>=1.10,<2", "tqdm>=4.67,<5", "pywin32>=1; sys_platform == 'win32'"], installed.get
    )
    assert plan.torchMissing
    assert plan.pipRequirements == ["monai>=1.3,<1.7", "tqdm>=4.67,<5"] + (
        ["pywin32>=1; sys_platform == 'win32'"] if os.name == "nt" else []
    )
    assert set(plan.constraints) == {"numpy==1.26.4", "SimpleITK==2.4.0", "requests==2.32.0", "vtk==9.3.0"}
    described = plan.describe()
    assert described[0].startswith("PyTorch") and "monai>=1.3,<1.7 (pip)" in described
    arguments = install.pipInstallArguments(plan, "c.txt")
    assert arguments[:4] == ["--upgrade-strategy", "only-if-needed", "-c", "c.txt"]
    assert "numpy" not in " ".join(arguments[4:])
    with pytest.raises(ValueError, match="numpy"):
        install.planInstall(["numpy>=2"], installed.get)
    old = install.planInstall([], {"torch": "1.13.1"}.get)
    assert not old.torchMissing and old.torchTooOld == "1.13.1" and old.empty
    assert install.changedImportedPackages(
        {"scipy": "1.10", "monai": None}, {"scipy": "1.13", "monai": "1.4"}, ["scipy.ndimage"]
    ) == ["scipy"]


# --- Slicer calls whose arguments we build, reproduced from Slicer's own source -------------------------
def _slicer_pip_install_argv(requirements, version: str) -> list[str]:
    """The argv ``slicer.util.pip_install(requirements)`` runs, assembled as Slicer assembles it.

    5.10 ``Base/Python/slicer/util.py``: ``args = "install", *requirements`` (a list) or
    ``"install", *shlex.split(requirements)`` (a string), then ``_executePythonModule("pip", args)``
    which runs ``[PythonSlicer, "-m", "pip", *args]``. 5.12 ``Base/Python/slicer/packaging.py``
    ``_build_pip_args``: ``["install", *requirements]`` (+ ``--no-deps``, + ``-c constraints`` when
    given as keywords, which we do not use), then ``executePythonModule("pip", args)``.
    """
    import shlex

    if isinstance(requirements, str):
        args = ["install", *shlex.split(requirements)]
    elif isinstance(requirements, list):
        args = ["install", *requirements]
    else:
        raise ValueError("pip_install requirement input must be string or list")
    assert version in ("5.10", "5.12")
    return [sys.executable, "-m", "pip", *args]


def _tiny_wheel(folder: Path, name: str = "diffusionreg_probe", version: str = "1.0") -> Path:
    """A minimal valid wheel (PEP 427) so pip can resolve offline."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.mark.parametrize("version", ["5.10", "5.12"])
def test_pip_accepts_the_install_arguments_as_slicer_assembles_them(tmp_path: Path, version: str) -> None:
    """Issue 10 item 1: ``pip install install ...`` -- our list must not start with ``install``."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels)
    installed = {"numpy": install.installedVersion("numpy")}
    plan = install.planInstall(["diffusionreg-probe>=1.0,<2"], lambda name: installed.get(name))
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(plan.constraints) + "\n", encoding="utf-8")
    arguments = install.pipInstallArguments(plan, constraints)
    assert arguments[0] != "install", "slicer.util.pip_install prepends 'install' itself"
    offline = ["--dry-run", "--no-index", "--find-links", str(wheels), "--disable-pip-version-check"]

    argv = _slicer_pip_install_argv(arguments, version) + offline
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Would install diffusionreg_probe-1.0" in completed.stdout.replace("diffusionreg-probe", "diffusionreg_probe")

    # The old list (with its own leading "install") is what users got: pip refuses it.
    wrong = subprocess.run(
        _slicer_pip_install_argv(["install", *arguments], version) + offline, capture_output=True, text=True, timeout=120
    )
    assert wrong.returncode != 0 and "install" in wrong.stderr


#: Parameters of the ``slicer.util`` functions the modules call, from Slicer 5.10's
#: ``Base/Python/slicer/util.py`` (unchanged in 5.12). ``**`` marks functions that forward extra
#: keywords to ``QMessageBox`` properties (``_messageDisplay`` -> ``messageBox``).
SLICER_UTIL_SIGNATURES = {
    "confirmOkCancelDisplay": ("text", "windowTitle", "parent", "**"),
    "confirmYesNoDisplay": ("text", "windowTitle", "parent", "**"),
    "infoDisplay": ("text", "windowTitle", "parent", "standardButtons", "**"),
    "warningDisplay": ("text", "windowTitle", "parent", "standardButtons", "**"),
    "errorDisplay": ("text", "windowTitle", "parent", "standardButtons", "**"),
    "setSliceViewerLayers": (
        "background",
        "foreground",
        "label",
        "foregroundOpacity",
        "labelOpacity",
        "fit",
        "rotateToVolumePlane",
    ),
    "tryWithErrorDisplay": ("message", "show", "waitCursor"),
    "loadVolume": ("filename", "properties", "returnNode"),
    "loadUI": ("path",),
    "childWidgetVariables": ("widget",),
    "addVolumeFromArray": ("narray", "ijkToRAS", "name", "nodeClassName"),
    "arrayFromVolume": ("volumeNode",),
    "pip_install": ("requirements",),
    "restart": (),
}
#: QMessageBox properties we pass through ``**kwargs`` (Qt: QMessageBox::detailedText).
MESSAGE_BOX_PROPERTIES = {"detailedText"}


def _slicer_util_calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            if (
                isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and (value.value.id, value.attr) == ("slicer", "util")
            ):
                yield node.func.attr, node


#: Other Slicer calls whose arguments we build (Slicer 5.10 ``Modules/Scripted/SampleData/SampleData.py``).
SLICER_OTHER_SIGNATURES = {
    "SampleData.SampleDataLogic.registerCustomSampleDataSource": (
        "category",
        "sampleName",
        "uris",
        "fileNames",
        "nodeNames",
        "customDownloader",
        "thumbnailFileName",
        "loadFileTypes",
        "loadFiles",
        "loadFileProperties",
        "checksums",
        "loadFileType",
    ),
}


def test_sample_data_registration_uses_parameters_slicer_has() -> None:
    """The modules' sample pairs register through the kit's ``SamplePair.register``."""
    calls = [
        node
        for path in _module_python_files("DiffusionRegCore")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in SLICER_OTHER_SIGNATURES
    ]
    assert calls, "the module registers its sample data"
    for call in calls:
        params = SLICER_OTHER_SIGNATURES[ast.unparse(call.func)]
        assert not call.args and {k.arg for k in call.keywords} <= set(params)


def test_every_slicer_util_call_uses_parameters_slicer_has() -> None:
    files = [p for m in MODULES + ("SpatialDiffusionReg",) for p in _module_python_files(m)]
    seen = set()
    for path in files:
        for name, call in _slicer_util_calls(path):
            seen.add(name)
            assert name in SLICER_UTIL_SIGNATURES, f"{path.name}:{call.lineno}: slicer.util.{name} is not in the checked table"
            params = SLICER_UTIL_SIGNATURES[name]
            positional = [p for p in params if p != "**"]
            assert len(call.args) <= len(positional), f"{path.name}:{call.lineno}: too many positional arguments to {name}"
            for keyword in call.keywords:
                if keyword.arg is None:
                    continue
                allowed = keyword.arg in positional or ("**" in params and keyword.arg in MESSAGE_BOX_PROPERTIES)
                assert allowed, f"{path.name}:{call.lineno}: slicer.util.{name} has no parameter {keyword.arg!r}"
    assert {"pip_install", "confirmOkCancelDisplay"} <= seen


# --- the panel: one "create new" per output, no control that does nothing, thin modules ------------------
def _selector_properties(widget) -> dict:
    found = {}
    for prop in widget.findall("property"):
        value = prop.find("*")
        if value is not None:
            found[prop.get("name")] = [s.text for s in value.findall("string")] if value.tag == "stringlist" else value.text
    return found


@pytest.mark.parametrize("module", [m for m in MODULES if _ui_files(m)])
def test_each_output_selector_offers_one_way_to_create_a_node(module: str) -> None:
    """qMRMLNodeComboBox shows one "Create new <type>" per node type with addEnabled, and the
    none entry reads as another one when its text says "Create new": at most one in total."""
    for path in _ui_files(module):
        for widget in ET.parse(path).getroot().iter("widget"):
            if widget.get("class") != "qMRMLNodeComboBox":
                continue
            props = _selector_properties(widget)
            creators = len(props.get("nodeTypes", [])) if props.get("addEnabled") == "true" else 0
            if props.get("noneEnabled") == "true" and "create" in (props.get("noneDisplay") or "").lower():
                creators += 1
            assert creators <= 1, f"{widget.get('name')}: {creators} 'create new' entries"


#: The panels of random methods, where a seed belongs: SynthPairs' pair generator (pair i of seed s).
SEEDED_UIS = {"SynthPairs": "SynthPairsGenerate.ui"}


@pytest.mark.parametrize("module", ["SpatialDiffusionReg", "SynthPairs", "MidlineShift"])
def test_no_random_seed_control_on_a_deterministic_method(module: str) -> None:
    """Registration and measurement are deterministic: no seed in their panels. A seed parameter
    exists only where a random method's .ui binds it (SynthPairs' Generate section)."""
    ui = (REPO / module / "Resources" / "UI" / f"{module}.ui").read_text(encoding="utf-8")
    assert "seed" not in ui.lower()
    seeded = {
        prop.findtext("string")
        for name in ([SEEDED_UIS[module]] if module in SEEDED_UIS else [])
        for prop in ET.parse(REPO / module / "Resources" / "UI" / name).getroot().iter("property")
        if prop.get("name") == "SlicerParameterName" and "seed" in (prop.findtext("string") or "").lower()
    }
    fields = {name for name in _parameter_fields(REPO / module / f"{module}.py") if "seed" in name.lower()}
    assert fields == seeded, f"seed parameters {fields} outside a generation panel ({seeded})"
    assert (module in SEEDED_UIS) == bool(seeded)


@pytest.mark.parametrize("module", SAMPLE_MODULES)
def test_sample_data_checksums_are_constants_that_match_the_files(module: str) -> None:
    """Issue 10 item 6: a checksum computed from the file it checks would check nothing."""
    path = REPO / module / f"{module}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.AnnAssign | ast.Assign) and ast.unparse(n).startswith("SAMPLE_SHA256")
    )
    for name, digest in constants.items():
        assert models.sha256File(REPO / "Resources" / "Sample" / name) == digest
    sample = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "SAMPLE")
    assert ast.unparse(sample.value.func) == "SamplePair" and ast.unparse(sample.value.args[1]) == "SAMPLE_SHA256"
    kit = ast.parse((CORE / "DiffusionRegCore.py").read_text(encoding="utf-8"))
    samplePair = next(n for n in kit.body if isinstance(n, ast.ClassDef) and n.name == "SamplePair")
    assert "sha256File" not in ast.unparse(samplePair) and "self.sha256[" in ast.unparse(samplePair)
    assert ast.unparse(sample.value.args[0]) == "SAMPLE_NAME"
    assert (REPO / module / "Resources" / "Icons" / f"{constant(tree, 'SAMPLE_NAME')}.png").is_file(), "Sample Data thumbnail"


def constant(tree: ast.Module, name: str):
    """The value of a module-level constant ``name = <literal>``."""
    return next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == name)


KIT_WIDGETS = (
    "progressBar",
    "logTextEdit",
    "deviceComboBox",
    "registerButton",
    "installDependenciesButton",
    "modelComboBox",
    "QTimer",
    "OverallProgress",
)


@pytest.mark.parametrize("module", [m for m in MODULES if m != "DiffusionRegCore"])
def test_modules_are_thin_on_top_of_the_kit(module: str) -> None:
    """Run/Cancel, progress, log, device and model selectors come from DiffusionRegCore.JobPanel, and
    the widget's lifecycle (parameter node, scene close, sample button) from its JobModuleWidget."""
    code = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
    assert _derives_from_kit_widget(module), f"{module}Widget must derive from DiffusionRegCore.JobModuleWidget"
    assert "JobPanel(" in _kit_widget_source()
    for name in KIT_WIDGETS:
        assert name not in code, f"{module}.py re-implements the kit's {name}"
    for path in _ui_files(module):
        names = _ui_names(path)
        assert not names & set(KIT_WIDGETS), f"{path.name} holds kit widgets {names & set(KIT_WIDGETS)}"
