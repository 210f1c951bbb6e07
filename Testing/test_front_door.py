"""One front door: the Python API with no options gives what the command line with no options gives.

Every registration default lives in the model's config.json (affine: ``inference``; deformable:
``inference`` too: instance optimisation and velocity refinement); the API's and the CLI's options default to None = "from the
model config". Run on the shipped models and the sample pair in ``Resources/Sample``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusionreg import cli
from diffusionreg.image import read_image
from diffusionreg.transforms import read_transform

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "Sample"
FIXED, MOVING = SAMPLE / "sample_fixed.nii.gz", SAMPLE / "sample_moving.nii.gz"

REGISTRATION_OPTIONS = {
    "affine": ("steps", "bidirectional", "initialize", "refine_iterations", "pose_search"),
    "deformable": ("instance_optimization", "refine_iterations", "quality"),
}


def _subparser(name: str):
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", sorted(REGISTRATION_OPTIONS))
def test_cli_registration_options_default_to_the_model_config(command):
    sub = _subparser(command)
    actions = {a.dest: a for a in sub._actions}
    for dest in REGISTRATION_OPTIONS[command]:
        assert actions[dest].default is None, dest
        assert "model" in (actions[dest].help or ""), f"--{dest} help must say the default is the model's"


def _affine_cli(model: str | None, out: Path) -> np.ndarray:
    args = [
        "affine",
        "--fixed",
        str(FIXED),
        "--moving",
        str(MOVING),
        "--output-transform",
        str(out),
        "--progress",
        "none",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert cli.main(args + (["--model", model] if model else [])) == 0
    return read_transform(out).matrix


def _deformable_cli(model: str, out: Path, *options: str) -> np.ndarray:
    assert (
        cli.main(
            [
                "deformable",
                *options,
                "--fixed",
                str(FIXED),
                "--moving",
                str(MOVING),
                "--model",
                model,
                "--output-transform",
                str(out),
                "--progress",
                "none",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return read_transform(out).field.array


@pytest.fixture
def tiny_affine_model(tmp_path):
    """A small random model whose config asks for non-default registration settings, so a CLI that
    ignored the config (or an API that did) would give another answer."""
    from tiny_models import tiny_affine_config, write_affine_model

    from diffusionreg.affine.config import AffineInference, RefineConfig, RefineLevel

    inference = AffineInference(
        steps=3, bidirectional=True, initialize="center", refine=RefineConfig(levels=(RefineLevel(8.0, 3),))
    )
    folder = tmp_path / "tiny-affine"
    write_affine_model(tiny_affine_config("tiny", inference=inference), folder)
    return folder


def test_affine_api_and_cli_read_the_defaults_of_the_model_config(tiny_affine_model, tmp_path):
    from diffusionreg.affine.register import load_model, register_affine

    model = load_model(str(tiny_affine_model), "mri")
    api = register_affine(read_image(FIXED), read_image(MOVING), model)
    assert api.unidirectional is not None and api.refine_score is not None, "bidirectional and refinement from config"
    by_cli = _affine_cli(str(tiny_affine_model), tmp_path / "t.h5")
    np.testing.assert_allclose(by_cli, api.transform.matrix, atol=1e-6)
    plain = register_affine(
        read_image(FIXED), read_image(MOVING), model, steps=4, bidirectional=False, initialize="moments", refine_iterations=0
    ).transform.matrix
    assert np.abs(plain - api.transform.matrix).max() > 1e-3, "the configured defaults change the answer"


def test_deformable_api_and_cli_read_the_defaults_of_the_model_config(tmp_path):
    import torch

    from diffusionreg.deformable.config import DeformableConfig, DeformableInference, SITRegConfig
    from diffusionreg.deformable.field_refine import FieldRefineConfig
    from diffusionreg.deformable.register import build_network, export_model, load_model, register_deformable

    torch.manual_seed(0)
    config = DeformableConfig(
        name="tiny",
        grid_shape=(16, 16, 16),
        spacing_mm=12.0,
        sitreg=SITRegConfig(feature_channels=(4, 4), head_channels=(4, 4)),
        inference=DeformableInference(io_steps=2, io_lr=1e-3, refine=FieldRefineConfig(iterations=2, control_factor=2)),
    )
    folder = tmp_path / "tiny-deformable"
    export_model(build_network(config), config, folder)
    model = load_model(str(folder))
    api = register_deformable(read_image(FIXED), read_image(MOVING), model)
    assert api.metrics["instance_optimization_steps"] == 2 and api.metrics["refine_iterations"] == 2
    written = _deformable_cli(str(folder), tmp_path / "field.nii.gz")
    assert np.abs(written - api.forward.field.array).max() < 1e-4  # mm; the file stores float32


@pytest.fixture
def tiny_deformable_model(tmp_path):
    """A small random SITReg model whose config holds quality presets unlike its defaults."""
    import torch

    from diffusionreg.deformable.config import DeformableConfig, DeformableInference, SITRegConfig
    from diffusionreg.deformable.field_refine import FieldRefineConfig
    from diffusionreg.deformable.quality import QualityPreset
    from diffusionreg.deformable.register import build_network, export_model

    torch.manual_seed(0)
    config = DeformableConfig(
        name="tiny",
        grid_shape=(16, 16, 16),
        spacing_mm=12.0,
        sitreg=SITRegConfig(feature_channels=(4, 4), head_channels=(4, 4)),
        inference=DeformableInference(
            io_steps=2,
            io_lr=1e-3,
            refine=FieldRefineConfig(iterations=2, control_factor=2),
            qualities=(
                QualityPreset("fast", io_steps=0, refine_iterations=1, refine_coarse_iterations=1, refine_upsample=1.0),
                QualityPreset("best", io_steps=3, refine_iterations=3, refine_coarse_iterations=0, refine_upsample=1.5),
            ),
        ),
    )
    folder = tmp_path / "tiny-deformable"
    export_model(build_network(config), config, folder)
    return folder


@pytest.mark.parametrize("quality", ["fast", "best"])
def test_deformable_quality_presets_come_from_the_model_config_and_api_equals_cli(tiny_deformable_model, tmp_path, quality):
    from diffusionreg.deformable.register import load_model, register_deformable

    model = load_model(str(tiny_deformable_model))
    preset = {p.name: p for p in model.cfg.inference.qualities}[quality]
    api = register_deformable(read_image(FIXED), read_image(MOVING), model, want_inverse=False, quality=quality)
    m = api.metrics
    assert m["quality"] == quality and m["instance_optimization_steps"] == preset.io_steps
    assert m["refine_iterations"] == preset.refine_iterations
    assert m["refine_coarse_iterations"] == preset.refine_coarse_iterations
    assert m["field_grid_shape"] == [int(round(16 * preset.refine_upsample))] * 3
    written = _deformable_cli(str(tiny_deformable_model), tmp_path / "field.nii.gz", "--quality", quality)
    assert np.abs(written - api.forward.field.array).max() < 1e-4  # mm; the file stores float32
    default = register_deformable(read_image(FIXED), read_image(MOVING), model, want_inverse=False)
    assert default.metrics["quality"] == "default" and default.metrics["instance_optimization_steps"] == 2
    assert np.abs(default.forward.field.array - api.forward.field.array).max() > 1e-4, "the preset changes the answer"


def test_explicit_options_override_the_quality_preset(tiny_deformable_model):
    from diffusionreg.deformable.register import load_model, register_deformable

    model = load_model(str(tiny_deformable_model))
    result = register_deformable(
        read_image(FIXED), read_image(MOVING), model, io_steps=1, refine_iterations=0, want_inverse=False, quality="best"
    )
    assert result.metrics["instance_optimization_steps"] == 1 and result.metrics["refine_iterations"] == 0


def test_an_unknown_quality_is_refused_in_one_line(tiny_deformable_model, tmp_path, capsys):
    from diffusionreg.deformable.register import load_model, register_deformable
    from diffusionreg.errors import InputError

    model = load_model(str(tiny_deformable_model))
    with pytest.raises(InputError, match="unknown quality 'medium'; this model has default, fast, best"):
        register_deformable(read_image(FIXED), read_image(MOVING), model, quality="medium")
    with pytest.raises(SystemExit) as exit_info:
        _deformable_cli(str(tiny_deformable_model), tmp_path / "field.nii.gz", "--quality", "medium")
    assert exit_info.value.code == 2 and "--quality" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["lung-vessels", "brain-mri-deformable"])
def test_shipped_deformable_models_define_every_quality(model):
    """The shipped configs hold the fast and best presets: fast does less work than the default,
    best at least as much."""
    import json

    from diffusionreg.deformable.config import DeformableConfig

    cfg = DeformableConfig.from_dict(json.loads((ROOT / "Resources" / "Models" / model / "config.json").read_text()))
    assert sorted(q.name for q in cfg.inference.qualities) == ["best", "fast"]
    fast, default, best = (cfg.inference.at_quality(q) for q in ("fast", "default", "best"))

    def fine_iterations(settings):
        return settings.refine.iterations - settings.refine.coarse_iterations

    assert fast.io_steps <= default.io_steps <= best.io_steps
    assert fine_iterations(fast) <= fine_iterations(default) <= fine_iterations(best)


@pytest.mark.slow
def test_shipped_affine_model_api_with_no_options_equals_the_cli(tmp_path):
    from diffusionreg.affine.register import load_model, register_affine

    model = load_model(None, "mri")
    api = register_affine(read_image(FIXED), read_image(MOVING), model)
    assert api.refine_score is not None, "the shipped model's config turns the refinement on"
    np.testing.assert_allclose(_affine_cli(None, tmp_path / "affine.h5"), api.transform.matrix, atol=1e-6)


@pytest.mark.slow
def test_shipped_deformable_model_api_with_no_options_equals_the_cli(tmp_path):
    from diffusionreg.deformable.register import load_model, register_deformable

    fixed, moving = read_image(FIXED), read_image(MOVING)
    model = load_model("brain-mri")
    defaults = model.cfg.inference
    assert defaults.refine.iterations > 0, "the shipped model's config turns the refinement on"
    api = register_deformable(fixed, moving, model)
    assert api.metrics["refine_iterations"] == defaults.refine.iterations
    assert api.metrics["instance_optimization_steps"] == defaults.io_steps
    written = _deformable_cli("brain-mri", tmp_path / "field.nii.gz")
    assert np.abs(written - api.forward.field.array).max() < 1e-4  # mm; the file stores float32
