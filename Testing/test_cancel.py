"""Cancel at any moment, or fail while committing: the outputs are all written or none.

The command is ``deformable`` with five outputs and a tiny registered model (``tiny_registry``).
One output location already holds a file, which a cancelled run must leave exactly as it was.
SIGINT (Ctrl-C) and SIGTERM (the Slicer runner's Cancel) are sent while the network works and
between the renames of the commit: the ``write`` stage reports ``renaming FLAG`` before each
rename, and $DIFFUSIONREG_TEST_PAUSE_BEFORE_RENAME holds it there long enough for the signal
to land before that rename (after the earlier ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from diffusionreg.outputs import PAUSE_BEFORE_RENAME_ENV, OutputSet

# In the order the command declares (and so commits) them.
OUTPUTS = {
    "--output-transform": "d.nii.gz",
    "--output-inverse-transform": "dinv.nii.gz",
    "--output-volume": "w.nrrd",
    "--output-jacobian": "j.nii.gz",
    "--output-json": "r.json",
}
EARLIER = b"an earlier result that must survive a cancelled run\n"
# Seconds the commit waits before each rename when a test signals there.
PAUSE_S = 0.5


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cancel_inputs")
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (20, 22, 24)], indexing="ij")
    for name, shift in (("fixed.nii.gz", 0.0), ("moving.nii.gz", 2.0)):
        blob = 100.0 * np.exp(-((i - 9 - shift) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 30.0) + 0.5 * i
        image = sitk.GetImageFromArray(np.swapaxes(blob.astype(np.float32), 0, 2))
        image.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(image, str(folder / name))
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _start(pair: Path, out: Path, registry: Path, refine_iterations: int, pause: float) -> subprocess.Popen:
    args = [
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
        str(refine_iterations),
        "--device",
        "cpu",
        "--progress",
        "json",
    ]
    for flag, name in OUTPUTS.items():
        args += [flag, str(out / name)]
    env = {**os.environ, "DIFFUSIONREG_MODELS": str(registry), PAUSE_BEFORE_RENAME_ENV: str(pause), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "diffusionreg", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        cwd=REPO,
        env=env,
    )


def _wait_for(process: subprocess.Popen, stage: str, message: str) -> None:
    """Read JSON progress lines until ``{"stage": stage, "message": message}``."""
    for line in process.stdout:
        if line.startswith("{"):
            record = json.loads(line)
            if record["stage"] == stage and record["message"] == message:
                return
    raise AssertionError(f"the command ended before {stage}: {message}; stderr: {process.stderr.read()}")


# Where to cancel: (stage, message) of the progress line to signal on. Renames go in OUTPUTS order.
MOMENTS = {
    "while registering": ("register", "started"),
    "before the first rename": ("write", "renaming --output-transform"),
    "after two renames": ("write", "renaming --output-volume"),
    "after replacing the earlier file": ("write", "renaming --output-json"),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_cancel_leaves_the_outputs_as_they_were(moment, signum, pair, tiny_registry, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUTS["--output-volume"]).write_bytes(EARLIER)  # replaced on success, kept on cancel
    before, inputs_before = _snapshot(out), _snapshot(pair)
    registering = moment == "while registering"
    # While registering: enough refinement iterations to be still at work when the signal lands.
    process = _start(
        pair, out, tiny_registry, refine_iterations=100_000 if registering else 0, pause=0.0 if registering else PAUSE_S
    )
    try:
        _wait_for(process, *MOMENTS[moment])
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "cancelled"
    assert _snapshot(out) == before, "a cancelled run changed the output folder"
    assert _snapshot(pair) == inputs_before


def test_uncancelled_run_writes_every_output_and_no_leftovers(pair, tiny_registry, tmp_path) -> None:
    """The same run to its end: every output written, the earlier file replaced, no backups."""
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUTS["--output-volume"]).write_bytes(EARLIER)
    process = _start(pair, out, tiny_registry, refine_iterations=0, pause=0.0)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    renames = [
        json.loads(line)["message"] for line in stdout.splitlines() if line.startswith('{"stage": "write"') and "renaming" in line
    ]
    assert renames == [f"renaming {flag}" for flag in OUTPUTS]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS.values())
    assert (out / OUTPUTS["--output-volume"]).read_bytes() != EARLIER
    assert sitk.ReadImage(str(out / OUTPUTS["--output-volume"])).GetSize() == (20, 22, 24)


def test_a_failed_rename_undoes_the_earlier_ones(tmp_path) -> None:
    """Item 2/3: the third of three renames fails (its location became a folder after the checks):
    the first two outputs are removed, the file the second replaced is back, no temporary is left."""
    (tmp_path / "b.json").write_text("earlier b")
    outputs = OutputSet([("--input", tmp_path / "input.json")])
    for flag, name in (("--a", "a.json"), ("--b", "b.json"), ("--c", "c.json")):
        outputs.add(flag, tmp_path / name, (".json",))
    with pytest.raises(IsADirectoryError), outputs:
        for flag in ("--a", "--b", "--c"):
            outputs.temporary(flag).write_text(f"new {flag}")
        (tmp_path / "c.json").mkdir()  # the failure: something took the location meanwhile
        (tmp_path / "c.json" / "keep").write_text("")
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "c.json"]
    assert (tmp_path / "b.json").read_text() == "earlier b"


def test_an_error_before_the_commit_removes_the_temporaries(tmp_path) -> None:
    outputs = OutputSet([], progress=None)
    outputs.add("--a", tmp_path / "a.nii.gz", (".nii.gz",))
    with pytest.raises(RuntimeError, match="the work failed"), outputs:
        outputs.temporary("--a").write_bytes(b"half")
        raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []
