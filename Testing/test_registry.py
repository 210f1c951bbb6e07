"""The model registry: schema, the one torch-free reader/writer, and the shared vocabulary."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="install the test extra: pip install -e .[test]")

from diffusionreg import registry, vocabulary

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "Resources" / "Models.json"
SCHEMA = ROOT / "Resources" / registry.SCHEMA_NAME
CORE = ROOT / "DiffusionRegCore"


def _validator():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_registry_matches_its_schema():
    data = json.loads(REGISTRY.read_text(encoding="utf-8"))
    errors = sorted(_validator().iter_errors(data), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    keys = [(m["name"], m["task"]) for m in data["models"]]
    assert len(keys) == len(set(keys)), "(name, task) must be unique"
    for record in data["models"]:  # every local path exists and the weights are the registered ones
        for key in ("file", "config", "card"):
            if key in record:
                assert (REGISTRY.parent / record[key]).is_file(), record[key]
        if "file" in record:
            assert registry.sha256_file(REGISTRY.parent / record["file"]) == record["sha256"]


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"task": "segment"}, "is not one of"),
        ({"modality": "xray"}, "is not one of"),
        ({"sha256": "ABC"}, "does not match"),
        ({"file": "../outside/model.safetensors"}, "does not match"),
        ({"file": "/abs/model.safetensors"}, "does not match"),
        ({"url": "ftp://host/model.safetensors"}, "does not match"),
        ({"wieghts": "x"}, "Additional properties"),
    ],
)
def test_schema_refuses_bad_entries(change, phrase):
    good = dict(json.loads(REGISTRY.read_text(encoding="utf-8"))["models"][0])
    bad = {"models": [{**good, **change}]}
    messages = [e.message for e in _validator().iter_errors(bad)]
    assert any(phrase in m for m in messages), messages


def test_schema_needs_a_file_or_a_url():
    entry = {"name": "x", "task": "affine", "modality": "mri", "sha256": "0" * 64, "config": "c.json"}
    validator = _validator()
    assert not validator.is_valid({"models": [entry]})
    assert validator.is_valid({"models": [{**entry, "url": "https://example.org/x.safetensors"}]})


def test_schema_enums_are_the_vocabulary():
    entry = json.loads(SCHEMA.read_text(encoding="utf-8"))["$defs"]["entry"]["properties"]
    assert tuple(entry["modality"]["enum"]) == vocabulary.MODALITIES
    assert tuple(entry["task"]["enum"]) == vocabulary.TASKS
    assert set(vocabulary.MODALITY_LABELS) == set(vocabulary.MODALITIES)


def test_upsert_replaces_same_name_and_task_and_writes_valid_json(tmp_path):
    path = tmp_path / "Models.json"
    base = {"modality": "mri", "sha256": "0" * 64, "config": "c.json"}
    registry.upsert_entry(path, {"name": "a", "task": "affine", "file": "a.safetensors", **base})
    registry.upsert_entry(path, {"name": "a", "task": "deformable", "file": "d.safetensors", **base})
    registry.upsert_entry(path, {"name": "b", "task": "affine", "url": "https://h/b.safetensors", **base})
    registry.upsert_entry(path, {"name": "a", "task": "affine", "file": "a2.safetensors", **base, "sha256": "1" * 64})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [(m["name"], m["task"]) for m in data["models"]] == [("a", "affine"), ("a", "deformable"), ("b", "affine")]
    assert data["models"][0]["file"] == "a2.safetensors" and data["models"][0]["sha256"] == "1" * 64
    assert _validator().is_valid(data)
    assert [p.name for p in tmp_path.iterdir()] == ["Models.json"], "no temporary left behind"
    with pytest.raises(registry.RegistryError, match="needs 'file' or 'url'"):
        registry.upsert_entry(path, {"name": "c", "task": "affine"})


def test_entries_resolve_shipped_and_cached_paths(tmp_path):
    path = tmp_path / "Models.json"
    (tmp_path / "shipped.safetensors").write_bytes(b"w")
    cache = tmp_path / "cache"
    base = {"modality": "mri", "sha256": "0" * 64, "config": "c.json"}
    registry.write_records(
        path,
        [
            {"name": "here", "task": "affine", "file": "shipped.safetensors", **base},
            {"name": "far", "task": "deformable", "url": "https://h/x/far.safetensors?v=2", "size": 10, **base},
            {"name": "gone", "task": "affine", "file": "gone.safetensors", **base},
        ],
    )
    here, far, gone = registry.read_entries(path, cache=cache)
    assert here.file == tmp_path / "shipped.safetensors" and here.state == "installed"
    assert far.file == cache / "deformable" / "far" / "far.safetensors" and far.state == "downloadable"
    assert gone.state == "missing" and far.size == 10
    assert registry.entry_holding([here, far], tmp_path / "shipped.safetensors") is here
    assert registry.entry_holding([here, far], tmp_path) is here, "the folder holding the weights"
    assert registry.entry_holding([far], tmp_path / "shipped.safetensors") is None
    assert [e.name for e in registry.read_entries(path, "affine", cache)] == ["here", "gone"]


def test_unreadable_registry_is_one_line(tmp_path):
    path = tmp_path / "Models.json"
    path.write_text("{not json")
    with pytest.raises(registry.RegistryError, match="cannot read model registry"):
        registry.read_records(path)
    path.write_text(json.dumps({"models": [{"name": "x"}]}))
    with pytest.raises(registry.RegistryError, match="missing 'task'"):
        registry.read_records(path)


def test_user_models_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(tmp_path / "m"))
    assert registry.cache_dir() == tmp_path / "m" / "cache"
    monkeypatch.delenv(registry.MODELS_DIR_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform != "win32":
        assert registry.user_models_dir() == tmp_path / "xdg" / "DiffusionReg" / "models"


@pytest.mark.parametrize("name", ["registry.py", "vocabulary.py"])
def test_torch_free_modules_use_only_the_standard_library(name):
    tree = ast.parse((ROOT / "diffusionreg" / name).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_slicer_side_reads_the_registry_without_the_backend_package(tmp_path):
    """A fresh interpreter where ``diffusionreg`` is not importable (Slicer with the source checkout
    as module paths): the core library loads the registry and vocabulary from their files."""
    script = f"""
import sys
sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]
sys.path.insert(0, {str(CORE)!r})
try:
    import diffusionreg
except ImportError:
    pass
else:
    raise SystemExit('diffusionreg importable: the test does not test the by-path loading')
from DiffusionRegCoreLib import command, models, paths, progress
manager = models.ModelManager(paths.modelsRegistryPath(), {str(tmp_path)!r})
print(sorted({{(e.name, e.task, e.state) for e in manager.models()}}))
print(command.MODALITIES, progress.EXIT_BAD_INPUT, 'torch' in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    names, vocab = result.stdout.strip().splitlines()
    assert "('brain-mri', 'affine', 'installed')" in names and "('brain-mri', 'deformable', 'installed')" in names
    assert vocab == f"{vocabulary.MODALITIES} 2 False"
