"""Head pose: HU / HU+1024 detection, what is not a head CT, and the rigid + scale alignment."""

from __future__ import annotations

import numpy as np
import pytest

from diffusionreg.errors import InputError
from diffusionreg.image import Image, centred_grid
from diffusionreg.midline.config import MidlineInference
from diffusionreg.midline.phantom import phantom_head
from diffusionreg.midline.pose import align_to_template, check_head_ct, to_hounsfield
from diffusionreg.spaces import homogeneous, rotation_about_axis

SETTINGS = MidlineInference()
SHAPE = (64, 76, 66)  # the phantom on a 3 mm grid


def test_hu_and_unsigned_hu_are_told_apart() -> None:
    head = phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0)))
    same, removed = to_hounsfield(head)
    assert not removed and np.array_equal(same.array, head.array)
    stored = phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0)), offset_hu=1024.0)
    converted, removed = to_hounsfield(stored)
    assert removed
    np.testing.assert_allclose(converted.array, head.array, atol=1e-3)


def test_a_head_ct_passes() -> None:
    check_head_ct(phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0))), SETTINGS)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: Image(np.full((40, 40, 40), 300.0, np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), "no air"),
        (
            lambda: phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0))).with_array(
                np.clip(phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0))).array, -1000, 100)
            ),
            "skull-density",
        ),
        (lambda: phantom_head(centred_grid((64, 76, 2), 3.0, (0.0, 0.0, 0.0))), "at least 3 slices"),
        (lambda: phantom_head(centred_grid((64, 76, 10), (3.0, 3.0, 2.0), (0.0, 0.0, 0.0))), "at least 3 slices"),
    ],
)
def test_not_a_head_ct_is_refused(make, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        check_head_ct(make(), SETTINGS)


def test_alignment_recovers_a_known_pose() -> None:
    """The phantom turned 8 degrees (yaw), pitched 10, shifted and scaled 1.05: T maps the
    template's midsagittal plane onto the scan's."""
    template = phantom_head(centred_grid(SHAPE, 3.0, (0.0, 0.0, 0.0)))
    placement = homogeneous(rotation_about_axis((0, 0, 1), 8.0) @ rotation_about_axis((1, 0, 0), 10.0) * 1.05, (6.0, -4.0, 5.0))
    scan = phantom_head(centred_grid((80, 96, 50), (2.5, 2.5, 4.0), (6.0, -4.0, 5.0)), placement)
    pose = align_to_template(scan, template, MidlineInference(pose_iterations=40, pose_pitch_starts_deg=(0.0,)))
    assert pose.scale == pytest.approx(1.05, abs=0.02)
    probes = np.array([[0.0, -40.0, 20.0, 1.0], [0.0, 60.0, 30.0, 1.0], [40.0, 10.0, 10.0, 1.0]])
    error = np.linalg.norm((pose.matrix @ probes.T - placement @ probes.T)[:3], axis=0)
    assert np.all(error < 2.0), error
