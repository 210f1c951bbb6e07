"""Configs are parsed strictly (one helper for every config dataclass) and record what the
weights depend on."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from diffusionreg.affine.config import AffineConfig, AffineInference, RefineConfig, RefineLevel
from diffusionreg.deformable.config import DeformableConfig, ICONConfig
from diffusionreg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cls, data, phrase",
    [
        (AffineConfig, {"grid_sise": 64}, "affine config: unknown key 'grid_sise' (did you mean 'grid_size'?)"),
        (
            AffineConfig,
            {"inference": {"refine": {"levls": []}}},
            "affine config.inference.refine: unknown key 'levls' (did you mean 'levels'?)",
        ),
        (AffineConfig, {"zzz": 1}, "affine config: unknown key 'zzz'"),
        (AffineConfig, {"grid_size": "64"}, "affine config.grid_size: expected an integer"),
        (AffineConfig, {"zero_init_head": 1}, "expected true or false"),
        (AffineConfig, {"lin_std": [0.1]}, "affine config.lin_std: expected 2 values, got 1"),
        (AffineConfig, {"inference": {"initialize": "pca"}}, "inference.initialize 'pca'"),
        (AffineConfig, {"inference": {"steps": 0}}, "inference.steps must be >= 1"),
        (DeformableConfig, {"icon": {"unet_nrom": "BATCH"}}, "did you mean 'unet_norm'?"),
        (
            DeformableConfig,
            {"inference": {"refine": {"iteratons": 3}}},
            "deformable config.inference.refine: unknown key 'iteratons' (did you mean 'iterations'?)",
        ),
        (DeformableConfig, {"io_steps": 3}, "deformable config: unknown key 'io_steps'"),
        (
            DeformableConfig,
            {"inference": {"qualities": [{"name": "fast", "io_steps": 0, "refine_iteratons": 1}]}},
            "deformable config.inference.qualities[0]: unknown key 'refine_iteratons' (did you mean 'refine_iterations'?)",
        ),
        (DeformableConfig, {"spacing_mm": None}, "deformable config.spacing_mm: expected a number"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_with_one_line(cls, data, phrase):
    with pytest.raises(InputError) as caught:
        cls.from_dict(data)
    assert phrase in str(caught.value) and "\n" not in str(caught.value)


def test_configs_round_trip_through_json():
    affine = AffineConfig(
        inference=AffineInference(
            steps=7, bidirectional=True, initialize="center", refine=RefineConfig(levels=(RefineLevel(4.0, 3),))
        )
    )
    again = AffineConfig.from_dict(json.loads(affine.to_json()))
    assert again == affine and isinstance(again.inference.refine.levels[0], RefineLevel)
    assert isinstance(again.widths, tuple) and isinstance(again.inference.refine.levels, tuple)
    deformable = DeformableConfig(icon=ICONConfig(unet_norm="BATCH", unet_num_res_units=2))
    assert DeformableConfig.from_dict(json.loads(deformable.to_json())) == deformable


@pytest.mark.parametrize(
    "model",
    ["brain-mri", "brain-mri-deformable", "lung-vessels", "lung-vessels-real10", "lung-vessels-synth", "lung-vessels-pairs"],
)
def test_shipped_configs_parse_and_are_complete(model):
    """Every field is written out: nothing in a shipped model depends on a default in our code."""
    from diffusionreg.synth.config import SynthConfig

    data = json.loads((ROOT / "Resources" / "Models" / model / "config.json").read_text(encoding="utf-8"))
    cls = SynthConfig if "vqae" in data else AffineConfig if "method" not in data else DeformableConfig
    cfg = cls.from_dict(data)
    assert json.loads(cfg.to_json()) == data


def test_icon_passes_every_monai_unet_argument(monkeypatch):
    """The weights must not depend on MONAI's defaults: the network is built with every argument of
    MONAI's UNet taken from the config."""
    import monai.networks.nets as nets

    from diffusionreg.deformable.icon import TwoStepICON

    seen = []
    real = nets.UNet

    class Recording(real):
        def __init__(self, *args, **kwargs):
            seen.append((args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(nets, "UNet", Recording)
    cfg = ICONConfig(channels=(4, 8, 8), strides=(2, 2), steps=1, unet_num_res_units=1, unet_dropout=0.1)
    net = TwoStepICON(cfg, (16, 16, 16))
    parameters = set(inspect.signature(real.__init__).parameters) - {"self"}
    ((args, kwargs),) = seen
    assert not args and set(kwargs) == parameters, parameters ^ set(kwargs)
    assert kwargs["num_res_units"] == 1 and kwargs["dropout"] == 0.1
    assert any("Residual" in type(m).__name__ for m in net.modules()), "the config reaches MONAI"


def test_a_field_without_a_default_must_be_given():
    from diffusionreg.affine.config import RefineLevel
    from diffusionreg.errors import InputError
    from diffusionreg.strict_config import from_dict

    with pytest.raises(InputError, match=r"refine level: missing key"):
        from_dict(RefineLevel, {}, "refine level")
