"""The deformation training's feature bank: flips that keep every landmark on its anatomy, chunks
that are deterministic and rebuilt only when missing, and the same losses as fresh features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusionreg.midline.feature_bank import FeatureBank, with_features
from diffusionreg.midline.headframe import midline_column
from diffusionreg.midline.heads import training_heads
from diffusionreg.midline.losses import field_at
from diffusionreg.midline.network import MidlineModel
from diffusionreg.midline.synthetic import synth_slices
from diffusionreg.midline.training import deformation_losses


@pytest.fixture(scope="module")
def setting(shared_data: Path):
    from test_midline_cli import tiny_midline_config

    cfg = tiny_midline_config()
    cfg = dataclasses.replace(
        cfg, deformation=dataclasses.replace(cfg.deformation, bank_slices=6, bank_chunk=4, midline_points=3)
    )
    heads = training_heads(shared_data / "headct", [], cfg.inference, lambda _: None)
    torch.manual_seed(0)
    return cfg, heads, MidlineModel(cfg)


def test_flip_mirrors_images_and_points_about_the_midline(setting) -> None:
    cfg, heads, model = setting
    gen = torch.Generator().manual_seed(1)
    batch = synth_slices(heads, cfg.frame, cfg.synth, gen, 3, shifted_fraction=1.0, midline_points=3)
    sample = with_features(model, cfg, batch, gen)
    size = cfg.frame.slice_size
    flipped = sample.flipped(torch.tensor([True, False, True]), size)
    assert torch.equal(flipped.x[1], sample.x[1]) and torch.equal(flipped.landmarks[1], sample.landmarks[1])
    assert torch.equal(flipped.x[0], torch.flip(sample.x[0], dims=[1]))
    assert torch.equal(flipped.r[2], torch.flip(sample.r[2], dims=[1]))
    # points mirror about the slice centre, the template midline's column
    column = midline_column(cfg.frame)
    assert column == pytest.approx((size - 1) / 2)
    assert torch.allclose(flipped.landmarks[0, :, 0] + sample.landmarks[0, :, 0], torch.full((4,), 2.0 * column))
    assert torch.equal(flipped.landmarks[0, :, 1], sample.landmarks[0, :, 1])
    # the true field turns with the slice: mirrored, its lateral component negated
    assert torch.equal(flipped.field[0, 0], -torch.flip(sample.field[0, 0], dims=[0]))
    assert torch.equal(flipped.field[0, 1], torch.flip(sample.field[0, 1], dims=[0]))
    assert torch.allclose(
        field_at(flipped.field[:1], flipped.midline[:1, :, 0]), flipped.midline[:1, :, 1] - flipped.midline[:1, :, 0], atol=0.02
    )
    # a shift towards +i becomes a shift towards -i by the same amount
    shift = sample.landmarks[0, 3, 0] - sample.landmarks[0, 2, 0]
    assert abs(float(shift)) > 0.1
    assert torch.allclose(flipped.landmarks[0, 3, 0] - flipped.landmarks[0, 2, 0], -shift)
    # an image value at a landmark is the flipped image's value at the flipped landmark
    image = sample.x[:1].repeat(1, 2, 1, 1)
    back = field_at(torch.flip(image, dims=[2]), flipped.midline[:1, :, 0])
    assert torch.allclose(back, field_at(image, sample.midline[:1, :, 0]), atol=1e-5)
    assert torch.equal(
        sample.flipped(torch.ones(3, dtype=torch.bool), size).flipped(torch.ones(3, dtype=torch.bool), size).midline,
        sample.midline,
    )


def test_chunks_are_deterministic_and_built_once(setting, tmp_path: Path) -> None:
    cfg, heads, model = setting
    bank = FeatureBank.build(tmp_path, model, cfg, heads)
    assert len(bank) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["chunk_0000.pt", "chunk_0001.pt"]
    stamp = (tmp_path / "chunk_0000.pt").stat().st_mtime_ns
    (tmp_path / "chunk_0001.pt").unlink()
    again = FeatureBank.build(tmp_path, model, cfg, heads)
    assert (tmp_path / "chunk_0000.pt").stat().st_mtime_ns == stamp
    for name in ("x", "r", "x_tilde", "mask", "landmarks", "midline", "mls_mm", "field"):
        assert torch.equal(getattr(again.samples, name), getattr(bank.samples, name)), name
    # a second rank's chunks are made by that rank: this rank alone made chunk 0 only
    other = tmp_path / "ranks"
    (other / "chunk_0001.pt").parent.mkdir()
    (other / "chunk_0001.pt").write_bytes((tmp_path / "chunk_0001.pt").read_bytes())
    FeatureBank.build(other, model, cfg, heads, rank=0, world=2)
    assert (other / "chunk_0000.pt").exists()


def test_bank_batches_give_the_losses_of_fresh_features(setting, tmp_path: Path) -> None:
    cfg, heads, model = setting
    bank = FeatureBank.build(tmp_path, model, cfg, heads)
    sample = bank.batch(torch.Generator().manual_seed(3), 4, flip_prob=0.0)
    total, terms, u = deformation_losses(model, cfg, sample, 0.5)
    assert u.shape == (4, 2, cfg.frame.slice_size, cfg.frame.slice_size)
    assert torch.isfinite(total) and set(terms) == {"image", "smooth", "landmark", "hinge", "field"}
    total.backward()
    grads = [p.grad for p in model.deform.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in model.eps_normal.parameters())


def test_the_total_weighs_the_terms_as_configured(setting, tmp_path: Path) -> None:
    """total = image_weight (1 + ramp * progress) image + smooth + landmark + hinge + field, each
    with its configured weight (the image weight at 0 drops the spec's image term)."""
    cfg, heads, model = setting
    sample = FeatureBank.build(tmp_path, model, cfg, heads).batch(torch.Generator().manual_seed(3), 4, flip_prob=0.0)
    d = dataclasses.replace(cfg.deformation, image_weight=0.5, hinge_weight=0.3, field_weight=2.0)
    with torch.no_grad():
        total, terms, _ = deformation_losses(model, dataclasses.replace(cfg, deformation=d), sample, 0.5)
        dropped, _, _ = deformation_losses(
            model, dataclasses.replace(cfg, deformation=dataclasses.replace(d, image_weight=0.0)), sample, 0.5
        )
    image = 0.5 * (1.0 + d.image_weight_ramp * 0.5) * terms["image"]
    rest = d.smooth_weight * terms["smooth"] + d.landmark_weight * terms["landmark"] + 0.3 * terms["hinge"] + 2.0 * terms["field"]
    assert float(terms["image"]) > 0
    assert float(total) == pytest.approx(float(image + rest), rel=1e-6)
    assert float(dropped) == pytest.approx(float(rest), rel=1e-6)
