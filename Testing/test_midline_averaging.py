"""The midline measurement's averaged field: noise draws and the mirrored pass.

``inference.noise_draws`` averages the deformation network's velocity over draws of the
representation's noise; ``inference.mirror_average`` adds the mirrored slices' velocity, mirrored
back. Checked here with a tiny model whose deformation weights and eps_normal are random (so the
field is far from uniform, depends on the noise, and the network is not mirror-symmetric by itself):

* ``mirror_field`` is the field of the mirrored image (warping commutes with mirroring);
* with the mirrored pass, a mirrored head gives exactly the mirrored field, and without it not;
* one draw without mirroring is the spec's single pass, and K draws are the mean velocity of K
  consecutive draws of the fixed seed, integrated once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_midline_cli import tiny_midline_config

from diffusionreg.midline.diffusion import ddpm_scheduler, representation
from diffusionreg.midline.measure import NOISE_SEED, slice_fields
from diffusionreg.midline.network import MidlineModel, integrate, mirror_field, mirror_slices, warp_slices


def _config(noise_draws: int, mirror: bool):
    cfg = tiny_midline_config()
    return dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, noise_draws=noise_draws, mirror_average=mirror))


@pytest.fixture(scope="module")
def model() -> MidlineModel:
    torch.manual_seed(3)
    model = MidlineModel(tiny_midline_config())
    with torch.no_grad():
        for parameter in model.deform.parameters():
            parameter.normal_(0.0, 0.3)
        for parameter in model.eps_normal.parameters():  # MONAI zero-initialises the output: r would be 0
            parameter.add_(torch.randn_like(parameter), alpha=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    size = tiny_midline_config().frame.slice_size
    return torch.rand((3, 1, size, size), generator=gen) * 2 - 1


def test_mirror_field_is_the_mirrored_images_field(slices) -> None:
    gen = torch.Generator().manual_seed(1)
    u = torch.randn((len(slices), 2, *slices.shape[2:]), generator=gen) * 2.0
    mirrored_then_warped = warp_slices(mirror_slices(slices), mirror_field(u))
    assert torch.allclose(mirrored_then_warped, mirror_slices(warp_slices(slices, u)), atol=1e-4)
    assert torch.equal(mirror_field(mirror_field(u)), u)
    flipped_only = mirror_slices(u)  # positions mirrored but the i component not negated: wrong
    assert not torch.allclose(warp_slices(mirror_slices(slices), flipped_only), mirror_slices(warp_slices(slices, u)), atol=1e-2)


@pytest.mark.parametrize("noise_draws", [1, 2])
def test_mirrored_pass_makes_the_reading_mirror_exact(model, slices, noise_draws: int) -> None:
    cfg = _config(noise_draws, True)
    u = slice_fields(model, cfg, slices)
    assert u.abs().max() > 0.5  # a real, non-uniform field
    assert torch.allclose(slice_fields(model, cfg, mirror_slices(slices)), mirror_field(u), atol=1e-3)
    plain = _config(noise_draws, False)
    gap = (slice_fields(model, plain, mirror_slices(slices)) - mirror_field(slice_fields(model, plain, slices))).abs().max()
    assert gap > 0.05


def test_noise_draws_average_the_velocity_of_consecutive_draws(model, slices) -> None:
    cfg = _config(1, False)
    scheduler = ddpm_scheduler(cfg.diffusion)
    t = torch.full((len(slices),), cfg.diffusion.representation_t, dtype=torch.long)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        velocities = []
        for _ in range(3):
            r = representation(model.eps_normal, model.eps_all, scheduler, slices, t, torch.randn(slices.shape, generator=gen))
            velocities.append(model.deform(torch.cat([slices, r], 1)))
        steps = cfg.deformation.squaring_steps
        single = integrate(velocities[0], steps)
        averaged = integrate(torch.stack(velocities).mean(0), steps)
    assert torch.allclose(slice_fields(model, cfg, slices), single, atol=1e-6)
    three = slice_fields(model, _config(3, False), slices)
    assert torch.allclose(three, averaged, atol=1e-5)
    assert (three - single).abs().max() > 1e-3


def test_a_frame_whose_midline_is_not_the_slice_centre_is_refused() -> None:
    """Mirroring flips a slice about its centre column; it is the midline only when they coincide."""
    from diffusionreg.errors import InputError
    from diffusionreg.midline.config import MidlineConfig

    data = tiny_midline_config().to_dict()
    data["frame"]["centre_mm"] = [5.0, 17.0]
    with pytest.raises(InputError, match="midline_x_mm"):
        MidlineConfig.from_dict(data)
