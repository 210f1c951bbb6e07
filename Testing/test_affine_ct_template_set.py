"""bench/affine.py's CT-template set: the similarity score and the agreement of transforms, on
volumes and transforms with known answers, and the template and head mask the set scores over."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from diffusionreg.image import Image
from diffusionreg.spaces import homogeneous

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """bench/affine.py's functions (the script is not a package module)."""
    return SimpleNamespace(**runpy.run_path(str(REPO / "bench" / "affine.py")))


@pytest.fixture(scope="module")
def head():
    """(image, mask): a 40^3 volume of 2 mm voxels (LPS, off-centre origin) holding a textured
    ellipsoid 'head' (smoothed noise inside, 0 outside) and its mask."""
    rng = np.random.default_rng(3)
    index = np.indices((40, 40, 40), dtype=np.float64)
    inside = (((index[0] - 19.5) / 15) ** 2 + ((index[1] - 19.5) / 17) ** 2 + ((index[2] - 19.5) / 13) ** 2) < 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 1.5)
    array = np.where(inside, 1000.0 + 400.0 * texture / texture.std(), 0.0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-40.0, -30.0, -20.0)
    return Image(array, affine), Image(inside.astype(np.uint8), affine)


def translation(mm) -> np.ndarray:
    return homogeneous(np.eye(3), np.asarray(mm, dtype=np.float64))


def test_similarity_peaks_at_the_true_alignment(bench, head):
    image, mask = head
    itself = bench.template_similarity(image, mask, image, np.eye(4))
    shifted = bench.template_similarity(image, mask, image, translation((4.0, 0.0, 0.0)))
    assert itself["ncc"] == pytest.approx(1.0, abs=1e-6)
    assert itself["mattes_mi"] > shifted["mattes_mi"] + 0.1
    assert shifted["ncc"] < 0.9
    # A moved copy brought back by the matching transform scores as the image itself.
    moved = Image(image.array, translation((6.0, -4.0, 2.0)) @ image.affine)
    back = bench.template_similarity(image, mask, moved, translation((6.0, -4.0, 2.0)))
    assert back["mattes_mi"] == pytest.approx(itself["mattes_mi"], rel=1e-4)
    assert back["ncc"] == pytest.approx(1.0, abs=1e-6)


def test_similarity_of_an_empty_overlap_is_zero(bench, head):
    image, mask = head
    far = bench.template_similarity(image, mask, image, translation((500.0, 0.0, 0.0)))
    assert far == {"mattes_mi": 0.0, "ncc": 0.0}


def test_agreement_of_known_transforms(bench, head):
    _, mask = head
    points = bench.mask_points(mask)
    assert len(points) == int(mask.array.sum())
    pairs = bench.agreement_mm({"a": np.eye(4), "b": np.eye(4), "c": translation((0.0, 1.2, -1.6))}, points)
    assert list(pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs[("a", "b")] == (0.0, 0.0)
    assert pairs[("a", "c")] == pytest.approx((2.0, 2.0))
    # A rotation of 90 deg about the z axis through the origin moves each point by sqrt(2) |xy|.
    rot = homogeneous(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), np.zeros(3))
    mean, largest = bench.agreement_mm({"id": np.eye(4), "rot": rot}, points)[("id", "rot")]
    radius = np.sqrt(2.0) * np.linalg.norm(points[:, :2], axis=1)
    assert (mean, largest) == pytest.approx((radius.mean(), radius.max()))


def test_rotated_start_maps_back(bench, head):
    """A case rotated by its start pose, registered exactly (result = start), maps back to identity
    and scores as the CT as stored."""
    image, mask = head
    (case,) = bench.ct_template_cases({"head": image}, [90.0], seed=1)
    assert case["angle"] == 90.0 and case["subject"] == "head"
    axis = np.asarray(case["axis"])
    assert np.linalg.norm(axis) == pytest.approx(1.0) and np.min(np.abs(axis)) >= 0.2
    rotation = case["start"][:3, :3]
    assert np.degrees(np.arccos((np.trace(rotation) - 1.0) / 2.0)) == pytest.approx(90.0)
    assert bench.point_distances_mm(np.linalg.inv(case["start"]) @ case["start"], np.eye(4), bench.mask_points(mask)).max() < 1e-9
    stored = bench.template_similarity(image, mask, image, np.eye(4))
    rotated = bench.template_similarity(image, mask, case["moving"], case["start"])
    assert rotated["mattes_mi"] == pytest.approx(stored["mattes_mi"], rel=1e-3)
    assert rotated["ncc"] == pytest.approx(1.0, abs=1e-4)
    unregistered = bench.template_similarity(image, mask, case["moving"], np.eye(4))
    assert unregistered["mattes_mi"] < stored["mattes_mi"] - 0.1


def test_template_and_head_mask(bench, shared_data):
    """The set's fixed image is the midline pose template, non-negative (air near 0), and its head mask
    holds a head: 2.5-6 litres, the template's soft tissue and bone inside it, nothing above 0 HU outside."""
    template, mask = bench.ct_template(shared_data)
    assert template.grid.same_as(mask.grid)
    assert 0.0 <= float(template.array.min()) < 50.0  # air: about -1000 HU
    litres = float(mask.array.sum()) * float(np.prod(mask.spacing)) / 1e6
    assert 2.5 < litres < 6.0
    head_values = template.array[mask.array > 0]
    assert np.median(head_values) > 900.0  # soft tissue is about 1024 + 40
    outside = template.array[mask.array == 0]
    assert np.mean(outside > 1024.0) < 1e-3  # outside: nothing above 0 HU (air, and the scalp's fat and skin)


def test_refine_changes_are_applied_and_checked_strictly(bench):
    """``--refine``: the bench's changed refinement reaches the registration, and a typo is refused."""
    from diffusionreg.affine.config import AffineConfig
    from diffusionreg.errors import InputError

    cfg = AffineConfig()
    base = cfg.inference.refine
    changed = bench.changed_refinement(cfg, {"metric": "ncc", "levels": [{"spacing_mm": 4.0, "iterations": 7}]})
    assert (changed.metric, [(lv.spacing_mm, lv.iterations) for lv in changed.levels]) == ("ncc", [(4.0, 7)])
    assert changed.histogram_bins == base.histogram_bins
    with pytest.raises(InputError, match="did you mean 'metric'"):
        bench.changed_refinement(cfg, {"metrc": "ncc"})
    with pytest.raises(InputError, match="use mi or ncc"):  # the model config's own validation
        bench.changed_refinement(cfg, {"metric": "mse"})
