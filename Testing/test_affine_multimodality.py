"""Multi-modality training of the affine model as published (issue 16): one conditional model over
several datasets, class ids 1..N by modality, class 0 (agnostic) by class dropout with synthetic
contrast changes; the exported config and registry entry list the modalities; inference uses the
class of ``--modality``; a model refuses a modality it was not trained for.

Real data: a brain MRI (``brain/vxm_test_scan_T1``) and the head CT template (``headct``).
Tiny networks (:mod:`tiny_models`): these test the plumbing, never accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionreg.affine.config import AffineConfig
from diffusionreg.affine.contrast import invert_foreground, remap_contrast
from diffusionreg.affine.network import AffineDiffusionNet
from diffusionreg.affine.schedule import Schedule
from diffusionreg.affine.training import TrainingSet, TrainOptions, load_subject, make_batch, read_manifest, train
from diffusionreg.errors import InputError
from diffusionreg.training.options import RunOptions


def tiny(**overrides) -> AffineConfig:
    from tiny_models import tiny_affine_config

    settings = dict(batch_size=2, warmup_steps=1, artifact_prob=0.0, noise_std=0.0)
    settings.update(overrides)
    return tiny_affine_config("tiny-multi", **settings)


@pytest.fixture(scope="module")
def volumes(shared_data) -> dict[str, Path]:
    paths = {
        "mri": shared_data / "brain" / "vxm_test_scan_T1.nii.gz",
        "ct": shared_data / "headct" / "scct_head_template_2mm.nii.gz",
    }
    for path in paths.values():
        if not path.is_file():
            pytest.skip(f"{path} not found")
    return paths


class NetworkCalls:
    """Records the class ids and train/eval mode of every call of the real affine network."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, list[int]]] = []
        self.filters: list = []  # the network's input filter of each call (the Gabor bank for OCT)

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, AffineDiffusionNet):
                cls = args[2] if len(args) > 2 else None
                self.calls.append((module.training, [] if cls is None else cls.tolist()))
                self.filters.append(args[3] if len(args) > 3 else "none")

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_class_ids_follow_the_modality_and_drop_to_zero_at_the_configured_rate(volumes):
    cfg = tiny(class_dropout=0.25).with_classes(["mri", "ct"])
    assert (cfg.n_classes, cfg.class_names, cfg.modalities) == (2, ("mri", "ct"), ("mri", "ct", "any"))
    sched = Schedule.from_config(cfg)
    for modality, own in (("mri", 1), ("ct", 2)):
        subjects = [load_subject(volumes[modality], cfg, modality)]
        _, _, cls, _, _ = make_batch(subjects, cfg, sched, torch.Generator().manual_seed(3), modality, batch_size=200)
        ids = cls.tolist()
        assert set(ids) == {0, own}
        assert 0.17 < ids.count(0) / len(ids) < 0.33  # binomial(200, 0.25): mean 0.25, sd 0.03


def test_one_modality_trains_one_class_without_embedding():
    cfg = tiny().with_classes(["ct", "ct"])
    assert (cfg.n_classes, cfg.class_names, cfg.modalities) == (1, ("ct",), ("ct",))
    assert AffineDiffusionNet(cfg).blocks[0].class_emb is None


def test_agnostic_contrast_changes_remap_and_invert_but_keep_the_background():
    cfg = tiny(agnostic_remap_prob=1.0, agnostic_invert_prob=0.0)
    ramp = torch.linspace(-1, 1, 101).reshape(1, 1, 1, 101)
    remapped = remap_contrast(ramp, cfg, torch.Generator().manual_seed(0))
    assert torch.all(remapped[..., 1:] >= remapped[..., :-1]), "a remapping keeps the intensity order"
    assert not torch.allclose(remapped, ramp, atol=1e-3) and float(remapped[..., 0]) == -1.0
    inverted = invert_foreground(ramp, 0.05)
    u = (ramp + 1) / 2
    foreground = u > 0.05
    assert torch.equal(inverted[~foreground], ramp[~foreground]), "the background stays dark"
    assert torch.all(inverted[foreground][1:] < inverted[foreground][:-1]), "the foreground order is reversed"
    both = remap_contrast(ramp, tiny(agnostic_remap_prob=0.0, agnostic_invert_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(both, inverted)


def test_a_two_dataset_run_feeds_each_step_one_modality_and_exports_both(volumes, tmp_path):
    cfg = tiny(class_dropout=0.3)
    opts = TrainOptions([TrainingSet([str(volumes["mri"])], "mri"), TrainingSet([str(volumes["ct"])], "ct")], cfg, val_recover=1)
    out = tmp_path / "run"
    with NetworkCalls() as seen:
        summary = train(opts, RunOptions(output=out, steps=12, val_every=12, threads=1))
    steps = [ids for training, ids in seen.calls if training]
    assert len(steps) == 12 and all(len(ids) == 2 for ids in steps)
    for ids in steps:  # one dataset per step: its class, or 0 where dropped
        assert len(set(ids) - {0}) <= 1
    classes = {i for ids in steps for i in ids}
    assert classes == {0, 1, 2}, classes
    evaluation = [ids for training, ids in seen.calls if not training and len(ids) == 1]
    assert {ids[0] for ids in evaluation} == {1, 2}, "validation recovers each dataset with its own class"
    assert {"recovery_mm_mean_mri", "recovery_mm_mean_ct"} <= set(summary)
    config = json.loads((out / "best" / "config.json").read_text())
    assert (config["n_classes"], config["class_names"]) == (2, ["mri", "ct"])
    entry = json.loads((out / "Models.json").read_text())["models"][0]
    assert entry["modality"] == "any" and entry["modalities"] == ["mri", "ct", "any"]


def test_each_step_pairs_the_class_with_its_datasets_preprocessing(volumes, tmp_path):
    """An MRI dataset and an OCT one (a synthetic layered volume): every training call of the
    network with the OCT filter carries class 2 (or 0), every unfiltered one class 1 (or 0)."""
    from test_affine_oct_preprocessing import layered_volume

    from diffusionreg.image import Image, write_image

    oct_path = tmp_path / "layered.nii.gz"
    write_image(Image(layered_volume(1, (60, 96, 60)), np.diag([2.0, 2.0, 2.0, 1.0])), oct_path)
    sets = [TrainingSet([str(volumes["mri"])], "mri"), TrainingSet([str(oct_path)], "oct")]
    with NetworkCalls() as seen:
        train(TrainOptions(sets, tiny(class_dropout=0.3)), RunOptions(output=tmp_path / "run", steps=10, val_every=0, threads=1))
    steps = [(ids, f) for (training, ids), f in zip(seen.calls, seen.filters) if training]
    assert len(steps) == 10 and {f for _, f in steps} == {"none", "oct"}
    for ids, used in steps:
        assert set(ids) <= ({0, 2} if used == "oct" else {0, 1}), (ids, used)


def test_manifest_lists_datasets_relative_to_itself(tmp_path):
    (tmp_path / "a").mkdir()
    manifest = tmp_path / "sets.json"
    manifest.write_text(
        json.dumps(
            {"datasets": [{"data": ["a"], "modality": "mri"}, {"data": ["b.nii.gz"], "modality": "ct", "val": ["c.nii.gz"]}]}
        )
    )
    sets = read_manifest(manifest)
    assert [s.modality for s in sets] == ["mri", "ct"]
    assert sets[0].data == [str(tmp_path / "a")] and sets[0].val is None and sets[1].val == [str(tmp_path / "c.nii.gz")]
    for bad in (
        {"datasets": []},
        {"datasets": [{"data": ["a"], "modality": "any"}]},
        {"datasets": [{"data": "a", "modality": "ct"}]},
        {"datasets": [{"data": ["a"], "modality": "ct", "weight": 2}]},
    ):
        manifest.write_text(json.dumps(bad))
        with pytest.raises(InputError, match="training manifest"):
            read_manifest(manifest)


@pytest.fixture(scope="module")
def trained_by_cli(volumes, tmp_path_factory):
    """``diffusionreg train affine --data MRI --modality mri --data CT --modality ct`` (4 steps)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("multi")
    config = root / "tiny.json"
    config.write_text(tiny().to_json())
    done = run_cli(
        "train", "affine", "--data", str(volumes["mri"]), "--modality", "mri", "--data", str(volumes["ct"]),
        "--modality", "ct", "--config", str(config), "--steps", "4", "--val-every", "4", "--threads", "1",
        "--output", str(root / "run"), "--progress", "none", "--name", "tiny-multi",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def test_the_cli_trains_one_model_over_two_datasets(trained_by_cli):
    config = json.loads((trained_by_cli / "best" / "config.json").read_text())
    assert config["class_names"] == ["mri", "ct"] and config["n_classes"] == 2
    entry = json.loads((trained_by_cli / "Models.json").read_text())["models"][0]
    assert (entry["name"], entry["modalities"]) == ("tiny-multi", ["mri", "ct", "any"])
    card = (trained_by_cli / "best" / "MODEL_CARD.md").read_text()
    assert "(mri)" in card and "(ct)" in card


def test_cli_pairing_of_data_and_modality_is_checked(volumes, cli, tmp_path):
    common = ["train", "affine", "--steps", "1", "--output", str(tmp_path / "x"), "--progress", "none"]
    for extra, message in (
        (["--data", str(volumes["mri"]), "--data", str(volumes["ct"]), "--modality", "ct"], "one --modality per --data"),
        (["--data", str(volumes["mri"]), "--val", "a", "--val", "b"], "one --val per --data"),
        (["--manifest", str(tmp_path / "m.json"), "--data", str(volumes["mri"])], "leave out --data"),
        ([], "--data (one per modality) or --manifest"),
    ):
        done = cli(*common, *extra)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_inference_uses_the_class_of_the_modality(trained_by_cli, volumes):
    from diffusionreg.affine.register import load_model, register_affine
    from diffusionreg.image import read_image

    model = load_model(str(trained_by_cli / "best"), "ct")
    ct = read_image(volumes["ct"], dtype=np.float32)
    for modality, expected in (("ct", 2), ("mri", 1), ("any", 0)):
        with NetworkCalls() as seen:
            register_affine(ct, ct, model, modality=modality, steps=2, refine_iterations=0, pose_search=False)
        assert seen.calls and {i for _, ids in seen.calls for i in ids} == {expected}, (modality, seen.calls)


def test_cli_accepts_the_trained_modalities_and_refuses_others(trained_by_cli, volumes, cli, tmp_path):
    base = ["affine", "--model", str(trained_by_cli / "best"), "--fixed", str(volumes["ct"]), "--moving", str(volumes["ct"]),
            "--steps", "2", "--refine-iterations", "0", "--pose-search", "off", "--device", "cpu"]  # fmt: skip
    for modality in ("ct", "any"):
        done = cli(*base, "--modality", modality, "--output-transform", str(tmp_path / f"{modality}.h5"))
        assert done.returncode == 0, done.stderr[-2000:]
    done = cli(*base, "--modality", "oct", "--output-transform", str(tmp_path / "oct.h5"))
    assert done.returncode == 2 and "trained for mri, ct, any only" in done.stderr
    assert not (tmp_path / "oct.h5").exists()


def test_the_backend_and_the_panel_offer_the_exported_modalities(trained_by_cli, repo_root):
    """The exported registry entry is what both sides read: the backend picks the model for ct
    and any, the panel's modality list (DiffusionRegCore.model_choice) offers mri, ct and any."""
    import sys

    from diffusionreg.models import resolve

    registry = trained_by_cli / "Models.json"
    for modality in ("ct", "any"):
        assert resolve(None, "affine", modality, registry).name == "tiny-multi"
    core = str(repo_root / "DiffusionRegCore")
    if core not in sys.path:
        sys.path.insert(0, core)
    from DiffusionRegCoreLib import model_choice, models

    entries = models.ModelManager(registry, trained_by_cli / "user").models()
    assert model_choice.installedModalities(entries, "affine") == ["mri", "ct", "any"]
    for modality in ("mri", "ct", "any"):
        entry, reason = model_choice.modelToRun(entries, "affine", modality)
        assert (entry.name, reason) == ("tiny-multi", "")
    assert (
        model_choice.modelToRun(entries, "affine", "oct", "tiny-multi")[1]
        == "The model 'tiny-multi' is for MRI, CT, Any, not OCT"
    )
    assert model_choice.describeModel(entries[0]) == "Runs 'tiny-multi' (affine, MRI, CT, Any; registry)"
