"""The ``diffusionreg`` command end to end on real volumes (bad input: test_bad_inputs.py; cancel: test_cancel.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import REPO

from diffusionreg.image import Image, centred_grid, read_image, write_image
from diffusionreg.spaces import apply_affine
from diffusionreg.transforms import AffineTransform, write_transform

SAMPLE = REPO / "Resources" / "Sample"
FIXED_LABELS = SAMPLE / "sample_fixed_labels.nii.gz"
MOVING_LABELS = SAMPLE / "sample_moving_labels.nii.gz"


def test_help_lists_commands(cli) -> None:
    result = cli("--help", check=True)
    for command in ("evaluate", "resample", "train"):
        assert command in result.stdout


def test_import_pulls_in_no_gui_toolkits() -> None:
    code = (
        "import sys, diffusionreg, diffusionreg.cli, diffusionreg.image, diffusionreg.transforms, diffusionreg.evaluation;"
        "diffusionreg.cli.build_parser();"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'ctk', 'vtk', 'PythonQt', 'mrml')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def _simpleitk_dice(fixed_path: Path, moving_path: Path, transform_path: Path, labels: list[int]) -> dict[int, float]:
    """Dice by SimpleITK's own resampling followed by a direct voxel count."""
    fixed = sitk.ReadImage(str(fixed_path))
    moving = sitk.ReadImage(str(moving_path))
    warped = sitk.Resample(moving, fixed, sitk.ReadTransform(str(transform_path)), sitk.sitkNearestNeighbor, 0)
    f, w = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(warped)
    return {l: 2.0 * np.sum((f == l) & (w == l)) / (np.sum(f == l) + np.sum(w == l)) for l in labels}


def test_evaluate_matches_simpleitk_on_real_labels(cli, tmp_path: Path, shared_data: Path) -> None:
    fixed_path = shared_data / "brain/oasis_A_seg13.nii.gz"  # 256^3, LIA, 13 structures
    moving_path = fixed_path
    # An affine written by SimpleITK itself: a centred rotation with anisotropic scaling.
    fixed_image = sitk.ReadImage(str(fixed_path))
    centre = fixed_image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed_image.GetSize()])
    rotation = sitk.Euler3DTransform(centre, 0.12, -0.08, 0.15, (2.5, -1.5, 3.0))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    scale = np.diag([1.04, 0.97, 1.02])
    affine.SetMatrix((np.asarray(rotation.GetMatrix()).reshape(3, 3) @ scale).ravel().tolist())
    affine.SetTranslation(rotation.GetTranslation())
    transform_path = tmp_path / "sitk_affine.tfm"
    sitk.WriteTransform(affine, str(transform_path))
    labels = list(range(1, 14))
    output = tmp_path / "evaluation.json"
    cli(
        "evaluate",
        "--fixed-labels",
        str(fixed_path),
        "--moving-labels",
        str(moving_path),
        "--transform",
        str(transform_path),
        "--labels",
        ",".join(map(str, labels)),
        "--output-json",
        str(output),
        "--progress",
        "none",
        check=True,
    )
    result = json.loads(output.read_text())
    expected = _simpleitk_dice(fixed_path, moving_path, transform_path, labels)
    for label in labels:
        assert abs(result["dice"][str(label)] - expected[label]) < 0.005, (label, result["dice"], expected)
    assert 0.2 < np.mean(list(expected.values())) < 0.95  # a real, non-trivial misalignment
    assert set(result) >= {"dice", "mean_dice", "hd95", "mean_hd95"}


def test_evaluate_sample_prints_table_and_json(cli, tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    result = cli(
        "evaluate",
        "--fixed-labels",
        str(FIXED_LABELS),
        "--moving-labels",
        str(FIXED_LABELS),
        "--labels",
        "1,3,13",
        "--output-json",
        str(output),
        "--progress",
        "none",
        check=True,
    )
    data = json.loads(output.read_text())
    assert data["dice"] == {"1": 1.0, "3": 1.0, "13": 1.0}
    assert data["mean_hd95"] == 0.0
    assert "mean" in result.stdout and "Dice" in result.stdout


def test_evaluate_labels_file_and_json_progress(cli, tmp_path: Path) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# deep structures\n1 5\n6, 13\n")
    result = cli(
        "evaluate",
        "--fixed-labels",
        str(FIXED_LABELS),
        "--moving-labels",
        str(MOVING_LABELS),
        "--labels-file",
        str(labels_file),
        "--progress",
        "json",
        check=True,
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records and all(set(r) == {"stage", "fraction", "message"} for r in records)
    assert records[-1]["fraction"] == 1.0
    # The sample pair is genuinely misaligned: without a transform the overlap is poor.
    table = [line for line in result.stdout.splitlines() if line.strip().startswith("mean")]
    assert table and float(table[0].split()[1]) < 0.5


def test_evaluate_with_landmarks_and_field(cli, tmp_path: Path, shared_data: Path) -> None:
    case = shared_data / "lung/vessels_val_cc_by"
    fixed, moving = case / "case_054_1.nii.gz", case / "case_054_2.nii.gz"
    landmarks = case / "case_054_landmarks_voxel.csv"
    # A constant 2 mm field along L on a coarse 4 mm grid over the fixed image; TRE must follow.
    fixed_image = read_image(fixed)
    coarse = centred_grid(
        np.ceil(np.asarray(fixed_image.shape) * fixed_image.spacing / 4.0).astype(int) + 2,
        4.0,
        fixed_image.grid.centre_world(),
        fixed_image.grid.direction,
    )
    field = np.zeros(coarse.shape + (3,), np.float32)
    field[..., 0] = 2.0
    field_path = tmp_path / "shift.nii.gz"
    write_image(Image(field, coarse.affine), field_path)
    output = tmp_path / "lung.json"
    cli(
        "evaluate",
        "--fixed-labels",
        str(fixed),
        "--moving-labels",
        str(moving),
        "--landmarks",
        str(landmarks),
        "--transform",
        str(field_path),
        "--output-json",
        str(output),
        "--progress",
        "none",
        check=True,
    )
    data = json.loads(output.read_text())
    rows = np.loadtxt(landmarks, delimiter=",", skiprows=1)
    moving_image = read_image(moving)
    fixed_mm = apply_affine(fixed_image.affine, rows[:, :3])
    moving_mm = apply_affine(moving_image.affine, rows[:, 3:])
    shifted = fixed_mm + np.array([2.0, 0.0, 0.0])
    np.testing.assert_allclose(data["tre"]["initial_mean_mm"], np.linalg.norm(fixed_mm - moving_mm, axis=1).mean(), rtol=1e-9)
    np.testing.assert_allclose(data["tre"]["mean_mm"], np.linalg.norm(shifted - moving_mm, axis=1).mean(), rtol=1e-6)
    deformation = data["deformation"]
    assert deformation["folding_fraction"] == 0.0
    assert abs(deformation["jacobian_min"] - 1.0) < 1e-6 and abs(deformation["jacobian_max"] - 1.0) < 1e-6
    assert set(data["dice"]) == {"1", "2"}


def test_resample_cli_matches_simpleitk(cli, tmp_path: Path) -> None:
    matrix = np.eye(4)
    angle = np.deg2rad(12.0)
    matrix[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    matrix[:3, 3] = [5.0, -3.0, 2.0]
    transform_path = write_transform(AffineTransform(matrix), tmp_path / "t.h5")
    output = tmp_path / "warped.nrrd"
    moving = SAMPLE / "sample_moving.nii.gz"
    reference = SAMPLE / "sample_fixed.nii.gz"
    cli(
        "resample",
        "--input",
        str(moving),
        "--reference",
        str(reference),
        "--transform",
        str(transform_path),
        "--output",
        str(output),
        "--interpolation",
        "linear",
        "--progress",
        "none",
        check=True,
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    expected = sitk.GetArrayFromImage(
        sitk.Resample(
            sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat32),
            sitk.ReadImage(str(reference)),
            sitk.ReadTransform(str(transform_path)),
            sitk.sitkLinear,
            0.0,
        )
    )
    assert np.mean(np.abs(ours - expected) > 1e-3) < 1e-3
    assert ours.max() > 100  # the brain landed in the field of view


# --- bad inputs: the table in test_bad_inputs.py; here cancelling a long real resampling --------
def test_cancel_leaves_no_output(tmp_path: Path, shared_data: Path) -> None:
    """SIGTERM (the Slicer runner's Cancel) stops the work with exit 130 and no output file."""
    output = tmp_path / "big.nii.gz"
    big = shared_data / "brain/oasis_A_norm.nii.gz"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffusionreg",
            "resample",
            "--input",
            str(big),
            "--reference",
            str(big),
            "--interpolation",
            "bspline",
            "--output",
            str(output),
            "--progress",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        cwd=REPO,
    )
    for line in process.stdout:  # wait until the resampling stage has begun
        if '"stage": "resample"' in line:
            break
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr
    assert list(tmp_path.iterdir()) == []
