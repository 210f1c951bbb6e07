"""``frame.diffusion_pool``: a finer deformation grid over diffusion models of a coarser frame.

* The pooled slices of a frame are the slices of its ``diffusion_frame()`` (the same pixel
  centres): a phantom head sampled both ways has the same intensity centroid, to a small fraction
  of a pixel (a half-pixel misalignment would be 0.9 mm here).
* Back on the frame's grid, a linear ramp survives the round trip exactly in the interior.
* The features of a pooled frame have the frame's size, and its noise the diffusion grid's.
* The config refuses a pool that does not divide the slice size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_midline_cli import tiny_midline_config

from diffusionreg.errors import InputError
from diffusionreg.image import centred_grid
from diffusionreg.midline.config import HeadFrame, MidlineConfig
from diffusionreg.midline.diffusion import (
    ddpm_scheduler,
    diffusion_noise,
    from_diffusion_grid,
    representation,
    to_diffusion_grid,
)
from diffusionreg.midline.headframe import slab_hu
from diffusionreg.midline.network import MidlineModel
from diffusionreg.midline.phantom import phantom_head

FINE = HeadFrame(slice_size=128, pixel_mm=1.8, diffusion_pool=2)


def _centroid_mm(hu: torch.Tensor, pixel_mm: float) -> np.ndarray:
    weights = hu.clamp(min=0.0)[0, 0].double().numpy()
    i, j = np.meshgrid(np.arange(weights.shape[0]), np.arange(weights.shape[1]), indexing="ij")
    return np.array([(weights * i).sum(), (weights * j).sum()]) / weights.sum() * pixel_mm


def test_pooled_slices_are_the_diffusion_frames_slices() -> None:
    coarse = FINE.diffusion_frame()
    assert (coarse.slice_size, coarse.pixel_mm, coarse.diffusion_pool) == (64, 3.6, 1)
    head = phantom_head(centred_grid((90, 110, 90), 2.0, (3.0, 17.0, 10.0)))
    volume = torch.from_numpy(head.array)
    pose = torch.eye(4, dtype=torch.float64)
    fine = slab_hu(volume, head.affine, pose, FINE, [10.0], [5.0])
    direct = slab_hu(volume, head.affine, pose, coarse, [10.0], [5.0])
    pooled = to_diffusion_grid(fine, 2)
    assert pooled.shape == direct.shape == (1, 1, 64, 64)
    # pixel (0, 0) is the same corner of the same field of view on both grids
    offset = _centroid_mm(pooled, coarse.pixel_mm) - _centroid_mm(direct, coarse.pixel_mm)
    assert np.all(np.abs(offset) < 0.15), offset
    # relative to each grid's centre, which both frames put at centre_mm
    fine_mm = _centroid_mm(fine, FINE.pixel_mm) - (FINE.slice_size - 1) / 2 * FINE.pixel_mm
    direct_mm = _centroid_mm(direct, coarse.pixel_mm) - (coarse.slice_size - 1) / 2 * coarse.pixel_mm
    assert np.all(np.abs(fine_mm - direct_mm) < 0.15), fine_mm - direct_mm


def test_a_linear_ramp_survives_the_round_trip() -> None:
    i = torch.arange(128, dtype=torch.float64)
    ramp = (3.0 * i[:, None] - 2.0 * i[None, :])[None, None]
    back = from_diffusion_grid(to_diffusion_grid(ramp, 2), 2)
    assert torch.allclose(back[..., 2:-2, 2:-2], ramp[..., 2:-2, 2:-2], atol=1e-9)
    assert torch.equal(from_diffusion_grid(to_diffusion_grid(ramp, 1), 1), ramp)


def test_features_of_a_pooled_frame_have_the_frames_size() -> None:
    cfg = dataclasses.replace(tiny_midline_config(), frame=FINE)
    cfg.validate()
    model = MidlineModel(cfg).eval()
    x = torch.rand((2, 1, 128, 128)) * 2 - 1
    noise = diffusion_noise(x, 2, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 1, 64, 64)
    t = torch.full((2,), 300, dtype=torch.long)
    with torch.no_grad():
        r = representation(model.eps_normal, model.eps_all, ddpm_scheduler(cfg.diffusion), x, t, noise, 2)
        assert r.shape == (2, 1, 128, 128)
        assert model.deform(torch.cat([x, r], 1)).shape == (2, 2, 128, 128)


def test_a_pool_that_does_not_divide_the_slices_is_refused() -> None:
    data = tiny_midline_config().to_dict()
    data["frame"]["diffusion_pool"] = 3
    with pytest.raises(InputError, match="diffusion_pool"):
        MidlineConfig.from_dict(data)
