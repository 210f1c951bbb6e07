"""``diffusionreg deformable`` with label maps: Dice before/after in the JSON report (what the
SynthPairs panel shows), equal to what ``diffusionreg.evaluation`` gives for the written field.

The model is the tiny registered ``tiny-sitreg`` (``tiny_registry``): the test is about the
report, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from diffusionreg.evaluation import evaluate
from diffusionreg.image import Image, read_image, write_image
from diffusionreg.transforms import read_transform


@pytest.fixture(scope="module")
def labelled_pair(tmp_path_factory) -> Path:
    """Two blobs 2 voxels apart, with label maps (1: the blob, 2: a box) on the images' grids."""
    folder = tmp_path_factory.mktemp("deformable_report")
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (20, 22, 24)], indexing="ij")
    for name, shift in (("fixed", 0.0), ("moving", 2.0)):
        blob = 100.0 * np.exp(-((i - 9 - shift) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 30.0) + 0.5 * i
        write_image(Image(blob.astype(np.float32), affine), folder / f"{name}.nii.gz")
        labels = np.zeros(blob.shape, np.uint8)
        labels[blob > 40.0] = 1
        labels[2:6, 3:8, int(15 + shift) : int(20 + shift)] = 2
        write_image(Image(labels, affine), folder / f"{name}_labels.nii.gz")
    return folder


def _deformable(pair: Path, out: Path, registry: Path, *extra: str):
    return run_cli(
        "deformable",
        "--fixed",
        str(pair / "fixed.nii.gz"),
        "--moving",
        str(pair / "moving.nii.gz"),
        "--model",
        "tiny-sitreg",
        "--instance-optimization",
        "0",
        "--refine-iterations",
        "2",
        "--device",
        "cpu",
        "--progress",
        "none",
        "--output-transform",
        str(out / "forward.nii.gz"),
        "--output-json",
        str(out / "report.json"),
        *extra,
        env={"DIFFUSIONREG_MODELS": str(registry)},
    )


def test_report_has_dice_of_the_written_field(labelled_pair: Path, tiny_registry: Path, tmp_path: Path) -> None:
    completed = _deformable(
        labelled_pair,
        tmp_path,
        tiny_registry,
        "--fixed-labels",
        str(labelled_pair / "fixed_labels.nii.gz"),
        "--moving-labels",
        str(labelled_pair / "moving_labels.nii.gz"),
    )
    assert completed.returncode == 0, completed.stderr
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert {"folding_percent", "ice_mean_mm", "seconds_total"} <= set(numbers)
    fixed_labels = read_image(labelled_pair / "fixed_labels.nii.gz")
    moving_labels = read_image(labelled_pair / "moving_labels.nii.gz")
    after = evaluate(fixed_labels, moving_labels, read_transform(tmp_path / "forward.nii.gz"))
    before = evaluate(fixed_labels, moving_labels, None)
    assert numbers["dice_after"] == pytest.approx(after["mean_dice"], abs=1e-6)
    assert numbers["dice_before"] == pytest.approx(before["mean_dice"], abs=1e-9)
    assert set(numbers["dice"]) == {"1", "2"} and numbers["absent_labels"] == []
    assert numbers["dice_before"] < 0.99  # the pair is not aligned to start with: the number means something


def test_report_without_labels_has_no_dice_and_one_label_map_is_refused(
    labelled_pair: Path, tiny_registry: Path, tmp_path: Path
) -> None:
    completed = _deformable(labelled_pair, tmp_path, tiny_registry)
    assert completed.returncode == 0, completed.stderr
    assert "dice_after" not in json.loads((tmp_path / "report.json").read_text())
    (tmp_path / "report.json").unlink()
    (tmp_path / "forward.nii.gz").unlink()
    completed = _deformable(labelled_pair, tmp_path, tiny_registry, "--fixed-labels", str(labelled_pair / "fixed_labels.nii.gz"))
    assert completed.returncode == 2 and "--fixed-labels and --moving-labels go together" in completed.stderr
    assert not any(tmp_path.iterdir())
