"""``diffusionreg midline`` end to end with a tiny random model: outputs land in the CT's world.

The tiny model's deformation network has a constant velocity (its flow bias), so the field is a
known uniform shift of 1.5 slice pixels along +i: the read-out must find MLS = 1.5 pixels in the
CT's millimetres, the landmarks must sit on the phantom's midsagittal plane in the CT's world, and
the written field (read back with SimpleITK) must carry each shifted landmark onto its normal one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffusionreg.image import Image, centred_grid, write_image
from diffusionreg.midline.config import DeformationConfig, DiffusionConfig, MidlineConfig, MidlineInference
from diffusionreg.midline.network import MidlineModel
from diffusionreg.midline.phantom import phantom_head
from diffusionreg.spaces import homogeneous, rotation_about_axis
from diffusionreg.training.export import export_weights

SHIFT_PX = 1.5
PHANTOM_CENTRE = (0.0, 17.0, 10.0)


def tiny_midline_config() -> MidlineConfig:
    return MidlineConfig(
        name="tiny",
        diffusion=DiffusionConfig(
            channels=(8, 8, 8), attention_levels=(False, False, False), norm_num_groups=4, num_head_channels=8
        ),
        deformation=DeformationConfig(channels=(4, 8, 8, 8), bank_slices=4, bank_chunk=2),
        # A single pass: the mirrored pass would cancel the constant velocity the tests rely on.
        # Calibrated 12 HU above the phantom's soft tissue (33 HU), so a measurement is shifted and says so.
        inference=MidlineInference(pose_iterations=30, pose_pitch_starts_deg=(0.0,), mirror_average=False, brain_median_hu=45.0),
    )


def write_tiny_midline_model(folder: Path) -> Path:
    """The tiny model (phantom template, uniform shift of ``SHIFT_PX`` along +i) exported to ``folder``."""
    cfg = tiny_midline_config()
    torch.manual_seed(0)
    template = phantom_head(centred_grid((60, 76, 66), 3.0, PHANTOM_CENTRE))
    model = MidlineModel(cfg, template.shape)
    model.set_template(torch.from_numpy(template.array), template.affine)
    with torch.no_grad():
        model.deform.flow.bias.copy_(torch.tensor([SHIFT_PX, 0.0]))
    export_weights(model, cfg.to_json(), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_midline_model(tmp_path_factory.mktemp("tiny-midline"))


@pytest.fixture(scope="module")
def placement() -> np.ndarray:
    return homogeneous(rotation_about_axis((0, 0, 1), 8.0), (4.0, -3.0, 2.0))


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory, placement) -> Path:
    """An oblique (in-plane rotated grid), anisotropic phantom CT stored as HU + 1024."""
    direction = rotation_about_axis((0, 0, 1), -20.0)
    grid = centred_grid((110, 150, 80), (1.6, 1.3, 2.0), (4.0, 14.0, 12.0), direction)
    path = tmp_path_factory.mktemp("ct") / "phantom_ct.nii.gz"
    write_image(phantom_head(grid, placement, offset_hu=1024.0), path)
    return path


@pytest.fixture(scope="module")
def run(ct_path, tiny_model, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("out")
    paths = {k: out / n for k, n in [("json", "r.json"), ("lm", "l.mrk.json"), ("field", "f.nii.gz"), ("table", "t.csv")]}
    done = cli(
        "midline", "--input", str(ct_path), "--output-json", str(paths["json"]), "--output-landmarks", str(paths["lm"]),
        "--output-field", str(paths["field"]), "--output-table", str(paths["table"]), "--model", str(tiny_model),
        "--progress", "none", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done, paths


@pytest.fixture(scope="module")
def cli():
    from conftest import run_cli

    return run_cli


def test_report_in_ct_millimetres(run, ct_path) -> None:
    done, paths = run
    assert "HU + 1024" in done.stderr
    report = json.loads(paths["json"].read_text())
    assert report["hu_offset_removed"] is True
    assert report["soft_tissue_shift_hu"] == pytest.approx(12.0, abs=1.0)
    assert len(report["notes"]) == 2 and all(f"note: {ct_path}: {n}" in done.stderr for n in report["notes"])
    assert "shifted by +12 HU to the soft-tissue calibration" in report["notes"][1]
    expected = SHIFT_PX * tiny_midline_config().frame.pixel_mm * report["pose_scale"]
    assert report["case_mls_mm"] == pytest.approx(expected, rel=1e-3)
    assert report["side"] == "right"  # u along +i: the structure sits on the -x (patient right) side
    assert report["flag"] is (expected >= 5.0)
    assert report["slices"] and report["slice_of_maximum"] in [s["index"] for s in report["slices"]]
    rows = list(csv.DictReader(paths["table"].open()))
    assert len(rows) == len(report["slices"])
    assert float(rows[0]["mls_mm"]) == pytest.approx(report["slices"][0]["mls_mm"], abs=1e-3)


def test_landmarks_on_the_midsagittal_plane_of_the_ct(run, placement) -> None:
    _, paths = run
    report = json.loads(paths["json"].read_text())
    normal_axis = placement[:3, 0]  # the phantom's left-right axis in the CT's world
    for s in report["slices"]:
        for name in ("anterior_falx", "posterior_falx", "normal"):
            offset = float(np.dot(np.asarray(s["landmarks_lps_mm"][name]) - placement[:3, 3], normal_axis))
            assert abs(offset) < 1.5, (name, offset)  # the pose's accuracy on an 8 mm grid


def test_field_on_the_ct_grid_carries_shifted_onto_normal(run, ct_path) -> None:
    _, paths = run
    ct = sitk.ReadImage(str(ct_path))
    field = sitk.ReadImage(str(paths["field"]), sitk.sitkVectorFloat64)
    assert field.GetSize() == ct.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(field.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(field.GetDirection(), ct.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(field)  # (z, y, x, 3); read before the transform takes the buffer
    assert np.abs(array[-1]).max() == 0.0  # the top slices are outside every measured slab
    transform = sitk.DisplacementFieldTransform(field)
    report = json.loads(paths["json"].read_text())
    for s in report["slices"]:
        moved = transform.TransformPoint(tuple(s["landmarks_lps_mm"]["shifted"]))
        np.testing.assert_allclose(moved, s["landmarks_lps_mm"]["normal"], atol=0.05)


def test_markups_load_in_slicer(run) -> None:
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLMarkupsJsonStorageNode"):
        pytest.skip("slicer-core without markups storage")
    _, paths = run
    report = json.loads(paths["json"].read_text())
    scene = slicer.vtkMRMLScene()
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    storage.SetScene(scene)
    storage.SetFileName(str(paths["lm"]))
    node = storage.AddNewMarkupsNodeFromFile(str(paths["lm"]), "midline")
    assert node is not None and node.GetNumberOfControlPoints() == 4 * len(report["slices"])
    ras = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(2, ras)  # slice 0's shifted structure, Slicer's RAS
    lps = report["slices"][0]["landmarks_lps_mm"]["shifted"]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-3)
    scene.Clear(1)


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    write_image(Image(array.astype(np.float32), np.diag([*spacing, 1.0])), path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("2d", "must be 3D"),
        ("single-slice", "single slice"),
        ("mri", "no air"),
        ("no-skull", "skull-density"),
    ],
)
def test_bad_inputs_exit_2(kind: str, message: str, tmp_path: Path, tiny_model: Path, cli) -> None:
    if kind == "2d":
        path = tmp_path / "flat.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.float32)), str(path))
    elif kind == "single-slice":
        path = _write(tmp_path / "one.nii.gz", np.zeros((32, 32, 1)))
    elif kind == "mri":
        path = _write(tmp_path / "mri.nii.gz", np.random.default_rng(0).uniform(0, 900, (40, 40, 40)), (4.0, 4.0, 4.0))
    else:
        head = phantom_head(centred_grid((60, 76, 66), 3.0, PHANTOM_CENTRE))
        path = _write(tmp_path / "brain.nii.gz", np.clip(head.array, -1000, 60), (3.0, 3.0, 3.0))
    out = tmp_path / "r.json"
    done = cli("midline", "--input", str(path), "--output-json", str(out), "--model", str(tiny_model), "--progress", "none")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert not out.exists()


@pytest.mark.slow  # builds the 1 mm template head and a 256^2 synthetic CT
def test_synth_command_writes_a_case_of_known_shift(tmp_path: Path, shared_data: Path, cli) -> None:
    out, truth = tmp_path / "case.nii.gz", tmp_path / "truth.json"
    done = cli(
        "midline", "synth", "--template-dir", str(shared_data / "headct"), "--output", str(out),
        "--output-truth", str(truth), "--shift-mm", "6", "--side", "right", "--pixel-mm", "2.5",
        "--slice-mm", "6", "--hu-offset", "1024", "--progress", "none",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(truth.read_text())
    assert facts["case_mls_mm"] == pytest.approx(6.0) and facts["side"] == "right"
    image = sitk.ReadImage(str(out))
    np.testing.assert_allclose(image.GetSpacing(), (2.5, 2.5, 6.0))
    assert float(sitk.GetArrayViewFromImage(image).min()) >= 0.0  # stored as HU + 1024, unsigned
    best = max(facts["slices"], key=lambda s: s["mls_mm"])
    assert best["mls_mm"] == pytest.approx(6.0, rel=0.03)
    bad = cli("midline", "synth", "--output", str(out), "--output-truth", str(truth), "--shift-mm", "40", "--progress", "none")
    assert bad.returncode == 2 and "--shift-mm" in bad.stderr
