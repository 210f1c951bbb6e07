"""Every bad input the commands know, in one table: exit code, the one line, nothing touched.

Each row runs the real command line (``python -m diffusionreg``) on tiny images (a tiny random
model where the command needs one) and asserts, besides the exit code and the phrase:

* every input is byte-identical afterwards (sha256) and no file appeared or vanished beside it;
* the output folder is exactly as it was (empty, or holding the file the row put there);
* stderr is one ``error:`` line (plus argparse's single usage line for usage errors), no traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

SHAPE = (20, 22, 24)  # i, j, k
SPACING = 4.0


def _blob(centre_shift: float = 0.0) -> np.ndarray:
    """A smooth off-centre blob plus a ramp: registrable, not symmetric, no NaN."""
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    blob = np.exp(-((i - 9 - centre_shift) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 30.0)
    return (100.0 * blob + 0.5 * i).astype(np.float32)


def _sitk(array_ijk: np.ndarray, spacing: float = SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.swapaxes(array_ijk, 0, 2)), isVector=array_ijk.ndim == 4)
    image.SetSpacing([spacing] * 3)
    return image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_registry) -> dict[str, Path]:
    """Inputs shared by every row (copied per row) and the registry of the tiny models."""
    inputs = tmp_path_factory.mktemp("bad_inputs") / "inputs"
    inputs.mkdir()
    sitk.WriteImage(_sitk(_blob()), str(inputs / "fixed.nii.gz"))
    sitk.WriteImage(_sitk(_blob(2.0)), str(inputs / "moving.nrrd"))
    labels = (_blob() > 50).astype(np.uint8) + (_blob() > 80).astype(np.uint8)
    sitk.WriteImage(_sitk(labels), str(inputs / "fixed_labels.nii.gz"))
    sitk.WriteImage(_sitk((_blob(2.0) > 50).astype(np.uint8) * 2), str(inputs / "moving_labels.nii.gz"))
    translation = sitk.TranslationTransform(3, (2.0, 0.0, -1.0))
    sitk.WriteTransform(translation, str(inputs / "affine.h5"))
    (inputs / "landmarks.csv").write_text("fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n1,2,3,1,2,3\n4,5,6,4,5,6\n")
    return {"inputs": inputs, "registry": tiny_registry}


# --- bad files, made in the row's input folder ------------------------------------------------
def _write(path: Path, array: np.ndarray, compress: bool = False) -> None:
    sitk.WriteImage(_sitk(array), str(path), compress)


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    return array


def make(name: str, d: Path) -> None:
    """Create input file ``name`` in ``d`` (the row's input folder)."""
    blob = _blob()
    if name == "empty.nii":
        (d / name).write_bytes(b"")
    elif name == "corrupt.nii.gz":
        (d / name).write_bytes((d / "fixed.nii.gz").read_bytes()[:400])
    elif name == "text.nii.gz":
        (d / name).write_text("this is not an image\n")
    elif name == "header.nrrd":
        (d / name).write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2\nencoding: raw\n\n" + bytes(32))
    elif name == "flat.nii.gz":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 12), np.float32)), str(d / name))
    elif name == "four.nii.gz":
        sitk.WriteImage(sitk.JoinSeries([_sitk(blob), _sitk(blob)]), str(d / name))
    elif name == "vector.nii.gz":
        _write(d / name, np.stack([blob] * 3, -1))
    elif name == "voxel.nii.gz":
        _write(d / name, np.ones((1, 1, 1), np.float32))
    elif name == "constant.nii.gz":
        _write(d / name, np.zeros(SHAPE, np.float32))
    elif name.startswith("nan."):
        _write(d / name, _with_nan(blob), compress=name.endswith(".gz"))
    elif name == "huge.nii":
        import nibabel

        header = nibabel.Nifti1Header()
        header.set_data_shape((10000, 10000, 10000))
        header.set_data_dtype(np.float32)
        (d / name).write_bytes(header.binaryblock + bytes(4) + bytes(1024))
    elif name in ("short.nii", "short.nrrd", "short.mha"):
        _write(d / name, blob)
        _truncate(d / name)
    elif name == "short.nii.gz":  # a valid gzip stream of a truncated NIfTI
        _write(d / "full.nii", blob)
        raw = (d / "full.nii").read_bytes()
        (d / "full.nii").unlink()
        (d / name).write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif name in ("short.nhdr", "short.mhd"):  # detached data: the .raw beside it is short
        _write(d / name, blob)
        raw = next(p for p in d.iterdir() if p.stem == "short" and p.suffix == ".raw")
        _truncate(raw)
    elif name == "short.h5":
        (d / name).write_bytes((d / "affine.h5").read_bytes()[:2000])
    elif name == "text.tfm":
        (d / name).write_text("#Insight Transform File V1.0\nTransform: NoSuchTransform_double_3_3\n")
    elif name == "sheared.nii":
        import nibabel

        affine = np.array([[2, 0.8, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]])
        nibabel.save(nibabel.Nifti1Image(blob, affine), str(d / name))
    elif name == "no_dicom":
        (d / name).mkdir()
        (d / name / "notes.txt").write_text("no DICOM here\n")
    elif name == "extra.csv":
        (d / name).write_text("fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n1,2,3,1,2,3\n4,5,6,4,5,6,7\n")
    elif name == "symlink.nrrd":
        (d / name).symlink_to(d / "moving.nrrd")
    elif name == "hardlink.nrrd":
        os.link(d / "moving.nrrd", d / name)
    elif name == "zero_field.nii.gz":  # a displacement field on the fixed grid
        _write(d / name, np.zeros(SHAPE + (3,), np.float32))
    elif name == "small_mask.nii.gz":  # a mask on another grid than the field
        _write(d / name, np.ones((10, 11, 12), np.uint8))
    elif name == "bad_grid.json":  # an affine config whose network grid has a zero-length axis
        from diffusionreg.affine.config import compact

        (d / name).write_text(json.dumps({**json.loads(compact().to_json()), "grid_size": [64, 0, 64]}))
    elif name == "not_a_folder":
        (d / name).write_text("a file where a folder is expected\n")
    else:
        raise AssertionError(f"no maker for {name}")


def make_output(name: str, d: Path) -> None:
    """Create a file that already sits at an output location."""
    if name == "readonly.nii.gz":
        (d / name).write_bytes(b"an earlier result\n")
        (d / name).chmod(0o444)
    else:
        raise AssertionError(f"no maker for {name}")


# --- the table ------------------------------------------------------------------------------
RESAMPLE = ["resample", "--input", "{in}/moving.nrrd", "--reference", "{in}/fixed.nii.gz", "--output", "{out}/w.nii.gz"]
AFFINE = [
    "affine",
    "--fixed",
    "{in}/fixed.nii.gz",
    "--moving",
    "{in}/moving.nrrd",
    "--output-transform",
    "{out}/t.h5",
    "--model",
    "tiny-affine",
    "--steps",
    "2",
    "--refine-iterations",
    "0",
    "--device",
    "cpu",
]
DEFORMABLE = [
    "deformable",
    "--fixed",
    "{in}/fixed.nii.gz",
    "--moving",
    "{in}/moving.nrrd",
    "--output-transform",
    "{out}/d.nii.gz",
    "--model",
    "tiny-sitreg",
    "--instance-optimization",
    "0",
    "--refine-iterations",
    "0",
    "--device",
    "cpu",
]
EVALUATE = [
    "evaluate",
    "--fixed-labels",
    "{in}/fixed_labels.nii.gz",
    "--moving-labels",
    "{in}/moving_labels.nii.gz",
    "--output-json",
    "{out}/e.json",
]


def _set(base: list[str], *pairs: str) -> list[str]:
    """``base`` with ``--flag value`` pairs replaced (or appended); a lone flag is appended."""
    args = list(base)
    items = list(pairs)
    while items:
        flag = items.pop(0)
        value = items.pop(0) if items and not items[0].startswith("--") else None
        if flag in args and value is not None:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    return args


# (case, args, files to make in the input folder, files to put at output locations, exit code, phrase)
CASES = [
    # reading images
    ("missing file", _set(RESAMPLE, "--input", "{in}/nope.nii.gz"), [], [], 2, "input image not found"),
    ("folder without DICOM", _set(RESAMPLE, "--input", "{in}/no_dicom"), ["no_dicom"], [], 2, "no DICOM series"),
    ("empty file", _set(RESAMPLE, "--input", "{in}/empty.nii"), ["empty.nii"], [], 2, "the file is empty"),
    ("corrupt gzip", _set(RESAMPLE, "--input", "{in}/corrupt.nii.gz"), ["corrupt.nii.gz"], [], 2, "corrupted gzip"),
    ("text renamed .nii.gz", _set(RESAMPLE, "--input", "{in}/text.nii.gz"), ["text.nii.gz"], [], 2, "corrupted gzip"),
    (
        "bad NRRD header",
        _set(RESAMPLE, "--input", "{in}/header.nrrd"),
        ["header.nrrd"],
        [],
        2,
        "parsed 2 values, but dimension is 3",
    ),
    ("2D image", _set(RESAMPLE, "--input", "{in}/flat.nii.gz"), ["flat.nii.gz"], [], 2, "must be 3D"),
    ("4D image", _set(RESAMPLE, "--input", "{in}/four.nii.gz"), ["four.nii.gz"], [], 2, "is 4D"),
    (
        "vector image to register",
        _set(DEFORMABLE, "--moving", "{in}/vector.nii.gz"),
        ["vector.nii.gz"],
        [],
        2,
        "must be a scalar image",
    ),
    ("1x1x1 image", _set(RESAMPLE, "--input", "{in}/voxel.nii.gz"), ["voxel.nii.gz"], [], 2, "single slice"),
    ("constant moving, affine", _set(AFFINE, "--moving", "{in}/constant.nii.gz"), ["constant.nii.gz"], [], 2, "is constant"),
    (
        "constant moving, deformable (item 5)",
        _set(DEFORMABLE, "--moving", "{in}/constant.nii.gz"),
        ["constant.nii.gz"],
        [],
        2,
        "is constant",
    ),
    (
        "constant fixed, deformable (item 5)",
        _set(DEFORMABLE, "--fixed", "{in}/constant.nii.gz"),
        ["constant.nii.gz"],
        [],
        2,
        "is constant",
    ),
    ("NaN in .nii (item 8)", _set(RESAMPLE, "--input", "{in}/nan.nii"), ["nan.nii"], [], 2, "2 NaN or infinite voxels (NIfTI)"),
    (
        "NaN in .nii.gz (item 8)",
        _set(RESAMPLE, "--input", "{in}/nan.nii.gz"),
        ["nan.nii.gz"],
        [],
        2,
        "2 NaN or infinite voxels (NIfTI)",
    ),
    ("NaN in .nrrd", _set(RESAMPLE, "--input", "{in}/nan.nrrd"), ["nan.nrrd"], [], 2, "2 NaN or infinite voxels (NRRD)"),
    ("NaN in .mha", _set(RESAMPLE, "--input", "{in}/nan.mha"), ["nan.mha"], [], 2, "2 NaN or infinite voxels (MetaImage)"),
    (
        "huge header (item 6)",
        _set(RESAMPLE, "--input", "{in}/huge.nii"),
        ["huge.nii"],
        [],
        2,
        "declares 10000 x 10000 x 10000 voxels",
    ),
    (
        "truncated .nii (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.nii"),
        ["short.nii"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "truncated data in a valid .nii.gz (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.nii.gz"),
        ["short.nii.gz"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "truncated .nrrd (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.nrrd"),
        ["short.nrrd"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "truncated .nhdr data file (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.nhdr"),
        ["short.nhdr"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "truncated .mha (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.mha"),
        ["short.mha"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "truncated .mhd data file (item 4)",
        _set(RESAMPLE, "--input", "{in}/short.mhd"),
        ["short.mhd"],
        [],
        2,
        "file is shorter than its header says",
    ),
    (
        "sheared direction",
        _set(RESAMPLE, "--input", "{in}/sheared.nii"),
        ["sheared.nii"],
        [],
        2,
        "only supports orthonormal direction cosines",
    ),
    # reading transforms
    (
        "truncated .h5 transform (item 7)",
        _set(RESAMPLE, "--transform", "{in}/short.h5"),
        ["short.h5"],
        [],
        2,
        "file is shorter than its header says",
    ),
    ("unreadable .tfm (item 7)", _set(RESAMPLE, "--transform", "{in}/text.tfm"), ["text.tfm"], [], 2, "cannot read transform"),
    # models, modalities, devices, numbers, flags
    ("unknown model", _set(AFFINE, "--model", "no-such-model"), [], [], 2, "unknown model"),
    ("unknown modality", _set(AFFINE, "--modality", "xray"), [], [], 2, "invalid choice: 'xray'"),
    ("modality the model lacks (item 10)", _set(AFFINE, "--modality", "oct"), [], [], 2, "was trained for mri only"),
    ("ct for an mri-only model (issue 16)", _set(AFFINE, "--modality", "ct"), [], [], 2, "--modality ct: model tiny-affine"),
    ("any for a model without class 0 (issue 16)", _set(AFFINE, "--modality", "any"), [], [], 2, "was trained for mri only"),
    ("unknown device", _set(AFFINE, "--device", "tpu"), [], [], 2, "unknown device 'tpu'"),
    (
        "affine network grid with a zero axis (issue 16)",
        ["train", "affine", "--data", "{in}/fixed.nii.gz", "--config", "{in}/bad_grid.json", "--output", "{out}/run"],
        ["bad_grid.json"],
        [],
        2,
        "affine config.grid_size [64, 0, 64]: use an integer >= 2",
    ),
    (
        "device torch lacks: mps (item 9)",
        _set(AFFINE, "--device", "mps"),
        [],
        [],
        2,
        "--device mps: this torch build or machine has no MPS",
    ),
    (
        "device torch lacks: cuda:7 (item 9)",
        _set(DEFORMABLE, "--device", "cuda:7"),
        [],
        [],
        2,
        "--device cuda:7: CUDA is not available",
    ),
    ("negative steps", _set(AFFINE, "--steps", "-1"), [], [], 2, "--steps must be >= 1"),
    (
        "negative instance optimisation (item 18)",
        _set(DEFORMABLE, "--instance-optimization", "-1"),
        [],
        [],
        2,
        "--instance-optimization must be >= 0",
    ),
    (
        "negative refinement (item 18)",
        _set(DEFORMABLE, "--refine-iterations", "-2"),
        [],
        [],
        2,
        "--refine-iterations must be >= 0",
    ),
    ("unknown flag", _set(RESAMPLE, "--no-such-flag"), [], [], 2, "unrecognized arguments: --no-such-flag"),
    # labels and landmarks
    (
        "labels in neither volume (item 3)",
        _set(
            AFFINE, "--fixed-labels", "{in}/fixed_labels.nii.gz", "--moving-labels", "{in}/moving_labels.nii.gz", "--labels", "99"
        ),
        [],
        [],
        2,
        "labels 99 are in neither label volume",
    ),
    ("empty label list (item 11)", _set(EVALUATE, "--labels", ""), [], [], 2, "label list is empty"),
    ("non-numeric label", _set(EVALUATE, "--labels", "2,x"), [], [], 2, "label list has a non-numeric entry 'x'"),
    (
        "mask on another grid than the field",
        _set(EVALUATE, "--transform", "{in}/zero_field.nii.gz", "--mask", "{in}/small_mask.nii.gz"),
        ["zero_field.nii.gz", "small_mask.nii.gz"],
        [],
        2,
        "mask and displacement field are on different grids",
    ),
    (
        "labels alone",
        _set(AFFINE, "--fixed-labels", "{in}/fixed_labels.nii.gz"),
        [],
        [],
        2,
        "--fixed-labels and --moving-labels go together",
    ),
    (
        "landmark row too long (item 12)",
        _set(EVALUATE, "--landmarks", "{in}/extra.csv"),
        ["extra.csv"],
        [],
        2,
        "line 3 has 7 values but the header names 6 columns",
    ),
    # output locations (items 1, 3, 13, 14)
    (
        "output is the input (item 1)",
        _set(RESAMPLE, "--output", "{in}/moving.nrrd"),
        [],
        [],
        2,
        "output --output {in}/moving.nrrd is also input --input",
    ),
    (
        "affine output volume is the moving image (item 1)",
        _set(AFFINE, "--output-volume", "{in}/moving.nrrd"),
        [],
        [],
        2,
        "output --output-volume {in}/moving.nrrd is also input --moving",
    ),
    (
        "affine output volume is the fixed image (item 1)",
        _set(AFFINE, "--output-volume", "{in}/fixed.nii.gz"),
        [],
        [],
        2,
        "is also input --fixed",
    ),
    (
        "output is the initial transform (item 1)",
        _set(DEFORMABLE, "--initial-transform", "{in}/affine.h5", "--output-transform", "{in}/affine.h5"),
        [],
        [],
        2,
        "is also input --initial-transform",
    ),
    (
        "output is a symlink to the input (item 1)",
        _set(RESAMPLE, "--output", "{in}/symlink.nrrd"),
        ["symlink.nrrd"],
        [],
        2,
        "is also input --input",
    ),
    (
        "output is a hard link to the input (item 1)",
        _set(RESAMPLE, "--output", "{in}/hardlink.nrrd"),
        ["hardlink.nrrd"],
        [],
        2,
        "is also input --input",
    ),
    (
        "two outputs on one path (item 1)",
        _set(DEFORMABLE, "--output-jacobian", "{out}/d.nii.gz"),
        [],
        [],
        2,
        "outputs --output-transform and --output-jacobian are the same file",
    ),
    (
        "output folder missing",
        _set(EVALUATE, "--output-json", "{out}/missing/e.json"),
        [],
        [],
        2,
        "folder {out}/missing does not exist",
    ),
    (
        "overlay folder missing (item 13)",
        _set(AFFINE, "--output-overlay", "{out}/missing/o.png"),
        [],
        [],
        2,
        "folder {out}/missing does not exist",
    ),
    (
        "output folder is a file (item 3)",
        _set(RESAMPLE, "--output", "{in}/not_a_folder/w.nii.gz"),
        ["not_a_folder"],
        [],
        2,
        "is not a folder",
    ),
    (
        "existing read-only output (item 14)",
        _set(RESAMPLE, "--output", "{out}/readonly.nii.gz"),
        [],
        ["readonly.nii.gz"],
        2,
        "exists and is read-only; pass --overwrite",
    ),
    ("unsupported output extension", _set(RESAMPLE, "--output", "{out}/w.png"), [], [], 2, "unsupported extension"),
    ("detached output header", _set(RESAMPLE, "--output", "{out}/w.mhd"), [], [], 2, "unsupported extension"),
    # commands added after the table was made: batch, midline, synth, models pull / verify
    (
        "batch: jobs file missing",
        ["batch", "--jobs", "{in}/nope.csv", "--output-dir", "{out}/cohort"],
        [],
        [],
        2,
        "file not found",
    ),
    (
        "midline: CT missing",
        ["midline", "--input", "{in}/nope.nii.gz", "--output-json", "{out}/r.json"],
        [],
        [],
        2,
        "CT not found",
    ),
    (
        "synth: unknown generator",
        ["synth", "--model", "no-such-model", "--count", "1", "--output", "{out}"],
        [],
        [],
        2,
        "unknown model 'no-such-model'",
    ),
    ("synth: no pairs asked for", ["synth", "--count", "0", "--output", "{out}"], [], [], 2, "--count"),
    ("synth: output folder missing", ["synth", "--count", "1", "--output", "{out}/nowhere"], [], [], 2, "not an existing folder"),
    ("models pull: unknown name", ["models", "pull", "no-such-model"], [], [], 2, "unknown model 'no-such-model'"),
    ("models verify: unknown name", ["models", "verify", "no-such-model"], [], [], 2, "unknown model 'no-such-model'"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'link -> target' for symlinks) of everything under ``folder``."""
    result = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            result[key] = "folder"
    return result


def run_cli(args: list[str], registry: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m diffusionreg ARGS --progress none`` with the tiny models' registry; no GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if registry is not None:
        env["DIFFUSIONREG_MODELS"] = str(registry)
    return subprocess.run(
        [sys.executable, "-m", "diffusionreg", *args, "--progress", "none"],
        check=False,
        capture_output=True,
        encoding="utf-8",
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize("case, args, inputs, existing, code, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, args, inputs, existing, code, phrase, workspace, tmp_path) -> None:
    if case.startswith("device torch lacks: mps"):
        import torch

        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    folder_in, folder_out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(workspace["inputs"], folder_in)
    folder_out.mkdir()
    for name in inputs:
        make(name, folder_in)
    for name in existing:
        make_output(name, folder_out)
    values = {"in": str(folder_in), "out": str(folder_out)}
    argv = [a.format(**values) for a in args]
    before_in, before_out = _snapshot(folder_in), _snapshot(folder_out)

    result = run_cli(argv, workspace["registry"])

    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    usage = [line for line in lines if line.startswith("usage:")]
    assert len(usage) <= 1 and len(lines) == 1 + len(usage), result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    assert phrase.format(**values) in lines[-1], lines[-1]
    assert _snapshot(folder_in) == before_in, "an input changed"
    assert _snapshot(folder_out) == before_out, "the output folder changed"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(workspace, tmp_path) -> None:
    """Item 3: an output in a folder we may not write is refused before any work."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = [a.format(**{"in": str(workspace["inputs"])}) for a in RESAMPLE[:-1]] + [str(locked / "w.nii.gz")]
        result = run_cli(args)
        assert result.returncode == 2 and "is not writable" in result.stderr, result.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_overwrite_replaces_a_read_only_output(workspace, tmp_path) -> None:
    """Item 14: with --overwrite the read-only file is replaced by the result."""
    target = tmp_path / "w.nii.gz"
    target.write_bytes(b"an earlier result\n")
    target.chmod(0o444)
    args = [a.format(**{"in": str(workspace["inputs"])}) for a in RESAMPLE[:-1]] + [str(target), "--overwrite"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    assert sitk.ReadImage(str(target)).GetSize() == SHAPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nii.gz"]


def test_overwrite_never_replaces_an_input(workspace, tmp_path) -> None:
    """Item 1 holds with --overwrite too."""
    shutil.copytree(workspace["inputs"], tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    args = [a.format(**{"in": str(tmp_path / "in")}) for a in RESAMPLE[:-1]] + [
        str(tmp_path / "in" / "moving.nrrd"),
        "--overwrite",
    ]
    result = run_cli(args)
    assert result.returncode == 2 and "is also input --input" in result.stderr, result.stderr
    assert _snapshot(tmp_path / "in") == before


def test_absent_labels_are_named_in_a_warning(workspace, tmp_path) -> None:
    """Item 11: a label in neither map is scored n/a with one warning line; the rest is scored."""
    values = {"in": str(workspace["inputs"]), "out": str(tmp_path)}
    result = run_cli([a.format(**values) for a in _set(EVALUATE, "--labels", "1,99")])
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "warning: labels 99 are in neither label volume; their Dice and HD95 are n/a"
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["absent_labels"] == [99] and data["dice"]["99"] is None and data["dice"]["1"] is not None


def test_an_internal_error_says_so(monkeypatch, capsys, workspace, tmp_path) -> None:
    """Item 18: a bug (not bad input) exits 1 with "internal error" and how to report it."""
    from diffusionreg import cli

    def broken(args, progress):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(cli, "_run_resample", broken)  # stands in for a real bug in a handler
    values = {"in": str(workspace["inputs"]), "out": str(tmp_path)}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main([a.format(**values) for a in RESAMPLE] + ["--progress", "none"])
    finally:  # main() installs the cancel handlers; give pytest its own back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: internal error (TypeError: unsupported operand") and "report" in err
    assert len(err.splitlines()) == 1


def test_affine_report_scores_absent_labels_na_and_writes_the_overlay(workspace, tmp_path) -> None:
    """Item 3: labels partly absent are scored n/a with a warning (no TypeError after the
    transform is written); the overlay and the transform are written together."""
    values = {"in": str(workspace["inputs"]), "out": str(tmp_path)}
    args = _set(
        AFFINE,
        "--fixed-labels",
        "{in}/fixed_labels.nii.gz",
        "--moving-labels",
        "{in}/moving_labels.nii.gz",
        "--labels",
        "1,99",
        "--output-overlay",
        "{out}/o.png",
    )
    result = run_cli([a.format(**values) for a in args], workspace["registry"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "warning: labels 99 are in neither label volume; their Dice and HD95 are n/a"
    assert "99: n/a" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "t.h5"]
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
