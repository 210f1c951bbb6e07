"""``midline.measure.displacement_field`` works in chunks of CT slices: any chunk size writes the
same field, bit for bit, as the whole volume at once (the geometry itself is tested through the
CLI in test_midline_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusionreg.image import Grid
from diffusionreg.midline.config import MidlineConfig
from diffusionreg.midline.measure import MidlineResult, displacement_field
from diffusionreg.midline.pose import Pose
from diffusionreg.midline.synthetic import measured_levels
from diffusionreg.spaces import homogeneous, rotation_about_axis


def _result(cfg: MidlineConfig) -> tuple[Grid, MidlineResult]:
    """A small oblique, anisotropic CT grid and a result whose slice fields are random (pixels)."""
    scale = 1.04
    pose = homogeneous(scale * rotation_about_axis((1, 0, 0), 12.0) @ rotation_about_axis((0, 0, 1), -7.0), (3.0, -8.0, 20.0))
    direction = rotation_about_axis((0, 1, 0), 9.0) @ np.diag([4.5, 4.2, 5.0])
    ct = Grid((40, 44, 23), homogeneous(direction, (-90.0, -80.0, -40.0)))
    rng = np.random.default_rng(3)
    n = cfg.frame.slice_size
    slices = [(z, rng.normal(0.0, 1.5, (2, n, n))) for z in measured_levels(cfg.frame)]
    result = MidlineResult(0.0, False, 5.0, "none", None, [], Pose(pose, scale, 0.0), False, "test", field_slices=slices)
    return ct, result


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunks_give_the_whole_volume_field_bit_for_bit(chunk: int) -> None:
    cfg = MidlineConfig()
    ct, result = _result(cfg)
    whole = displacement_field(ct, result, cfg, chunk_slices=ct.shape[2])
    chunked = displacement_field(ct, result, cfg, chunk_slices=chunk)
    measured = np.linalg.norm(whole.array, axis=-1) > 0
    assert 0.05 < measured.mean() < 0.95  # the slabs cover part of the CT: the comparison has content
    np.testing.assert_array_equal(chunked.array, whole.array)
    np.testing.assert_array_equal(chunked.affine, ct.affine)
