"""Model registry: listing, resolving names and paths, sha256 verification, safe loading."""

import json
from pathlib import Path

import pytest
import torch

from diffusionreg import models
from diffusionreg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _registry(tmp_path, sha=None):
    from safetensors.torch import save_file

    mdir = tmp_path / "Models" / "m1"
    mdir.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(mdir / "model.safetensors"))
    (mdir / "config.json").write_text(json.dumps({"grid_size": 32}))
    reg = tmp_path / "Models.json"
    reg.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "m1",
                        "task": "affine",
                        "modality": "mri",
                        "file": "Models/m1/model.safetensors",
                        "sha256": sha or models.sha256_file(mdir / "model.safetensors"),
                        "config": "Models/m1/config.json",
                    }
                ]
            }
        )
    )
    return reg, mdir


def test_list_resolve_and_load(tmp_path):
    reg, mdir = _registry(tmp_path)
    entries = models.list_models("affine", reg)
    assert [e.name for e in entries] == ["m1"] and entries[0].file.is_absolute()
    assert models.resolve(None, "affine", "mri", reg).name == "m1"
    assert models.resolve("m1", "affine", None, reg).file == mdir / "model.safetensors"
    assert models.resolve(str(mdir), "affine", "mri", reg).config == mdir / "config.json"
    assert torch.equal(models.load_state_dict(entries[0])["w"], torch.ones(3))
    assert models.load_config_json(entries[0]) == {"grid_size": 32}
    with pytest.raises(InputError, match="no deformable model"):
        models.resolve(None, "deformable", "mri", reg)
    with pytest.raises(InputError, match="unknown model"):
        models.resolve("nope", "affine", "mri", reg)


def test_sha256_mismatch_is_refused(tmp_path):
    reg, _ = _registry(tmp_path, sha="0" * 64)
    entry = models.resolve("m1", "affine", "mri", reg)
    with pytest.raises(InputError, match="sha256 mismatch"):
        models.load_state_dict(entry)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    entry = models.resolve(str(p), "affine", "mri", None)
    with pytest.raises(InputError, match="cannot load"):
        models.load_state_dict(entry)


def test_register_entry_keeps_other_models(tmp_path):
    reg, mdir = _registry(tmp_path)
    other = tmp_path / "Models" / "m2"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"x")
    (other / "config.json").write_text("{}")
    models.register_entry("m2", "deformable", "ct", other / "model.safetensors", other / "config.json", registry_path=reg)
    names = [m["name"] for m in json.loads(reg.read_text())["models"]]
    assert names == ["m1", "m2"]
    # one name may serve two tasks: registering m1 for deformable keeps the affine m1
    models.register_entry("m1", "deformable", "mri", other / "model.safetensors", other / "config.json", registry_path=reg)
    pairs = [(m["name"], m["task"]) for m in json.loads(reg.read_text())["models"]]
    assert ("m1", "affine") in pairs and ("m1", "deformable") in pairs and len(pairs) == 3
    assert models.resolve("m1", "deformable", registry_path=reg).file == other / "model.safetensors"


def test_shipped_registry_entry_is_valid():
    entries = [e for e in models.list_models("affine") if e.name == "brain-mri"]
    if not entries:
        pytest.skip("brain-mri not registered yet")
    e = entries[0]
    assert e.modality == "mri" and e.file.stat().st_size < 20e6
    models.verify(e)
    assert e.card is not None and e.card.exists()


def test_a_model_trained_from_a_preset_starts_from_any_pose_and_an_old_config_does_not():
    from diffusionreg.affine.config import AffineConfig, compact, full

    assert compact().inference.pose_search.enabled and full().inference.pose_search.enabled
    exported = json.loads(compact().to_json())  # what a training writes beside the weights
    assert AffineConfig.from_dict(exported).inference.pose_search.enabled
    del exported["inference"]["pose_search"]  # a config from before the pose search
    assert not AffineConfig.from_dict(exported).inference.pose_search.enabled
