"""Any-pose start of the affine registration (issue 16): search, exact chain, doubt, settings.

Real data: the held-out brain oasis_B (never used in training), block-averaged to 2 mm so every
registration here takes seconds. Poses are header-only (the voxels are shared, the matrix turned),
so the true transform is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusionreg.affine.config import AffineConfig, PoseSearchConfig, compact
from diffusionreg.affine.pose_search import candidate_rotations, cube_rotations, pooled, rotation_angle_deg
from diffusionreg.affine.register import build_model, load_model, register_affine
from diffusionreg.errors import InputError
from diffusionreg.image import Image, crop_or_pad, read_image, write_image
from diffusionreg.spaces import apply_affine, centred_affine, rotation_about_axis

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "Resources" / "Models" / "brain-mri" / "config.json"


@pytest.fixture(scope="module")
def brain(shared_data) -> Image:
    """oasis_B (held out), cropped to the head and block-averaged to 2 mm."""
    image = read_image(shared_data / "brain" / "oasis_B_norm.nii.gz", dtype=np.float32)
    return pooled(crop_or_pad(image, (40, 30, 30), (176, 190, 200)), 2.0)


@pytest.fixture(scope="module")
def shipped():
    return load_model(None, "mri")


def turned(image: Image, degrees: float, axis, shift) -> tuple[Image, np.ndarray]:
    """The same voxels turned about the image centre and shifted; and the true fixed -> moving map."""
    truth = centred_affine(image.grid.centre_world(), rotation_about_axis(axis, degrees), shift)
    return Image(image.array, truth @ image.affine), truth


def mean_error_mm(estimate: np.ndarray, truth: np.ndarray, image: Image) -> float:
    """Mean |T_est(x) - T_true(x)| over the brain voxels of ``image``."""
    points = apply_affine(image.affine, np.argwhere(image.array > 0.1 * image.array.max()).astype(np.float64))
    return float(np.linalg.norm(apply_affine(estimate, points) - apply_affine(truth, points), axis=1).mean())


def test_candidates_cover_every_rotation():
    cube = cube_rotations()
    assert len(cube) == 24 and np.allclose(cube[0], np.eye(3))
    assert np.allclose(np.linalg.det(cube), 1.0)
    assert len({tuple(np.round(c).astype(int).ravel()) for c in cube}) == 24
    candidates = candidate_rotations("cube-corners", 35.0)
    assert len(candidates) == 216 and np.allclose(candidates[0], np.eye(3))
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):  # random rotations (uniform: normalised Gaussian quaternions)
        w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
        rotation = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
        worst = max(worst, min(rotation_angle_deg(rotation, c) for c in candidates))
    assert worst < 37.0, "every rotation lies within reach of the pattern search from some candidate"


def test_a_start_150_degrees_away_is_recovered_within_2_mm(brain, shipped):
    moving, truth = turned(brain, 150.0, (1.0, -0.5, 0.8), (10.0, -20.0, 15.0))
    result = register_affine(brain, moving, shipped, steps=8, refine_iterations=20, pose_search=True)
    assert mean_error_mm(result.transform.matrix, truth, brain) < 2.0
    assert not result.doubtful and result.similarity > 0.6
    assert rotation_angle_deg(np.asarray(result.starts[0]["rotation"]), truth[:3, :3]) < 10.0


def test_the_start_pose_goes_through_the_chain_exactly(brain):
    """An untrained network with a zero head predicts the identity: the result is the search's
    pose itself, so the turned network grid must carry it into LPS exactly."""
    moving, truth = turned(brain, 120.0, (0.3, 1.0, -0.6), (-12.0, 8.0, 20.0))
    model = build_model(compact())
    result = register_affine(brain, moving, model, steps=1, refine_iterations=0, pose_search=True)
    start = np.asarray(result.starts[0]["rotation"])
    np.testing.assert_allclose(result.transform.matrix[:3, :3], start, atol=1e-9)
    assert rotation_angle_deg(start, truth[:3, :3]) < 6.0
    assert mean_error_mm(result.transform.matrix, truth, brain) < 6.0  # the 6 mm search grid's precision


def test_a_diffusion_that_makes_the_start_worse_is_not_kept(brain, tmp_path):
    """A random (untrained, non-zero head) network pulls the images apart; with the search on, the
    start pose scores higher and is what the refinement (here none) starts from."""
    from tiny_models import tiny_affine_config, write_affine_model

    write_affine_model(tiny_affine_config("random"), tmp_path / "random")
    model = load_model(str(tmp_path / "random"), "mri")
    moving, truth = turned(brain, 100.0, (1.0, 0.4, -0.7), (5.0, 10.0, -5.0))
    result = register_affine(brain, moving, model, refine_iterations=0, pose_search=True)
    assert mean_error_mm(result.diffusion_only.matrix, truth, brain) > 10.0, "the random network's answer is bad"
    np.testing.assert_allclose(result.transform.matrix[:3, :3], np.asarray(result.starts[0]["rotation"]), atol=1e-9)
    assert mean_error_mm(result.transform.matrix, truth, brain) < 6.0


def test_identity_stays_identity(brain, shipped):
    result = register_affine(brain, brain, shipped, steps=8, refine_iterations=20, pose_search=True)
    assert rotation_angle_deg(np.asarray(result.starts[0]["rotation"]), np.eye(3)) < 1e-6, "identity wins the search"
    assert mean_error_mm(result.transform.matrix, np.eye(4), brain) < 0.5
    assert len(result.starts) == 1, "a clear winner costs one run"


# Before the pose search existed, the shipped model gave these on the case below (computed with
# the code of commit a182ceb): the published method alone, and with 3 refinement steps per level.
PUBLISHED_8_STEPS = [
    [0.9933340187, -0.1459934514, -0.0494526498, 5.6311130041],
    [0.0858164759, 0.9780219543, -0.1709346388, -2.9703605799],
    [0.054671944, 0.2096616062, 0.9785493722, 2.5896016389],
]
REFINED_3_ITERATIONS = [
    [0.9741669398, -0.1675315091, -0.0698135334, 5.6457836885],
    [0.1045601394, 0.9534848344, -0.1951438907, -2.3194289383],
    [0.0832976565, 0.2111036953, 0.9606389654, 4.2340796157],
]


def test_pose_search_off_gives_the_old_result(shared_data, shipped):
    image = read_image(shared_data / "brain" / "oasis_B_norm.nii.gz", dtype=np.float32)
    image = crop_or_pad(image, (40, 30, 30), (176, 190, 200))
    moving, _ = turned(image, 20.0, (1.0, -0.5, 0.8), (6.0, -4.0, 3.0))
    # atol in mm (and unitless): thread counts change the last digits
    published = register_affine(image, moving, shipped, steps=8, refine_iterations=0, pose_search=False)
    np.testing.assert_allclose(published.transform.matrix[:3], PUBLISHED_8_STEPS, atol=1e-4)
    refined = register_affine(image, moving, shipped, steps=8, refine_iterations=3, pose_search=False)
    np.testing.assert_allclose(refined.transform.matrix[:3], REFINED_3_ITERATIONS, atol=1e-4)


def test_unrelated_images_are_flagged_doubtful_by_the_command(brain, tmp_path, cli):
    rng = np.random.default_rng(3)
    noise = Image(rng.random((60, 60, 60)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    write_image(brain, tmp_path / "brain.nii.gz")
    write_image(noise, tmp_path / "noise.nii.gz")
    report = tmp_path / "report.json"
    res = cli(
        "affine",
        "--fixed",
        str(tmp_path / "brain.nii.gz"),
        "--moving",
        str(tmp_path / "noise.nii.gz"),
        "--output-transform",
        str(tmp_path / "t.h5"),
        "--output-json",
        str(report),
        "--steps",
        "4",
        "--refine-iterations",
        "5",
        "--progress",
        "none",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr  # a warning, not an error: the outputs are written
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "doubtful" in warnings[0], res.stderr
    data = json.loads(report.read_text())
    assert data["doubtful"] is True and "below" in data["doubt_reason"]
    assert data["similarity_nmi"] < 0.4 and len(data["starts"]) >= 1
    assert (tmp_path / "t.h5").exists()


def test_good_registration_is_not_doubtful_in_the_report(brain, tmp_path, cli):
    moving, _ = turned(brain, 90.0, (0.3, 1.0, -0.6), (15.0, 5.0, -10.0))
    write_image(brain, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.nii.gz")
    common = ["--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"), "--steps", "8"]
    common += ["--refine-iterations", "10", "--progress", "none", "--device", "cpu"]
    res = cli("affine", *common, "--output-transform", str(tmp_path / "t.h5"), "--output-json", str(tmp_path / "r.json"))
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["doubtful"] is False and "doubt_reason" not in data and data["similarity_nmi"] > 0.6
    off = cli(
        "affine",
        *common,
        "--pose-search",
        "off",
        "--output-transform",
        str(tmp_path / "o.h5"),
        "--output-json",
        str(tmp_path / "o.json"),
    )
    assert off.returncode == 0 and "warning: result doubtful" in off.stderr, "90 deg without the search fails, and says so"

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "o.json").read_text(), parse_constant=refuse)  # strict JSON: no NaN
    assert report["doubtful"] is True and report["starts"][0]["search_score"] is None


def test_pose_search_settings_are_strict():
    data = json.loads(SHIPPED_CONFIG.read_text())
    config = AffineConfig.from_dict(data)
    assert config.inference.pose_search.enabled and config.inference.similarity.doubtful_below is not None
    for section, key, value, message in [
        ("pose_search", "keeep", 2, "did you mean 'keep'"),
        ("pose_search", "candidates", "sphere", "cube or cube-corners"),
        ("pose_search", "keep", 0, "keep >= 1"),
        ("pose_search", "enabled", "yes", "enabled"),
        ("similarity", "spacing_mm", 0.0, "spacing_mm > 0"),
    ]:
        broken = json.loads(json.dumps(data))
        broken["inference"][section][key] = value
        with pytest.raises(InputError, match=message):
            AffineConfig.from_dict(broken)
    old = json.loads(json.dumps(data))
    del old["inference"]["pose_search"], old["inference"]["similarity"]
    older = AffineConfig.from_dict(old).inference
    assert older.pose_search == PoseSearchConfig() and not older.pose_search.enabled, "configs without it: off"
    assert older.similarity.doubtful_below is None
