"""``diffusionreg batch``: a cohort of 6 tiny cases, one of them bad, in one process and under
``torchrun --nproc-per-node 2`` (gloo on CPU) with a rank killed mid-run and ``--resume``; bad rows
refused before anything runs.

The models are the tiny registered ones of ``tiny_registry``: the tests are about the cohort
machinery (records, resume, ranks, exit codes), not accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from diffusionreg.image import Image, write_image
from diffusionreg.outputs import PAUSE_BEFORE_RENAME_ENV
from diffusionreg.registry import REGISTRY_ENV, sha256_file

GOOD_IDS = ("a1", "a2", "a3", "d1", "e1")
BAD_ID = "bad"


def _blob(shift: float) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (20, 22, 24)], indexing="ij")
    return (100.0 * np.exp(-((i - 9 - shift) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 30.0) + 0.5 * i).astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_registry) -> Path:
    """``cohort.csv`` and its inputs (paths relative to it): 3 affine, 1 deformable, 1 evaluate and
    1 affine case whose moving image is constant (it passes the CSV check and fails when run)."""
    folder = tmp_path_factory.mktemp("cohort")
    grid = np.diag([4.0, 4.0, 4.0, 1.0])
    write_image(Image(_blob(0.0), grid), folder / "fixed.nii.gz")
    for n, shift in enumerate((1.0, 2.0, -1.5)):
        write_image(Image(_blob(shift), grid), folder / f"moving{n}.nii.gz")
    write_image(Image(np.full((20, 22, 24), 7.0, np.float32), grid), folder / "constant.nii.gz")
    write_image(Image((_blob(0.0) > 50).astype(np.uint8), grid), folder / "fixed_labels.nii.gz")
    write_image(Image((_blob(2.0) > 50).astype(np.uint8), grid), folder / "moving_labels.nii.gz")
    (folder / "cohort.csv").write_text(
        "task,id,fixed,moving,model,refine_iterations,fixed_labels,moving_labels,output_volume\n"
        "affine,a1,fixed.nii.gz,moving0.nii.gz,tiny-affine,2,,,\n"
        "affine,a2,fixed.nii.gz,moving1.nii.gz,tiny-affine,2,fixed_labels.nii.gz,moving_labels.nii.gz,\n"
        "affine,a3,fixed.nii.gz,moving2.nii.gz,tiny-affine,0,,,warped.nii.gz\n"
        f"affine,{BAD_ID},fixed.nii.gz,constant.nii.gz,tiny-affine,0,,,\n"
        "deformable,d1,fixed.nii.gz,moving1.nii.gz,tiny-sitreg,0,,,\n"
        "evaluate,e1,,,,,fixed_labels.nii.gz,moving_labels.nii.gz,\n",
        encoding="utf-8",
    )
    return folder / "cohort.csv"


def _env(registry: Path, **extra: str) -> dict:
    return {**os.environ, REGISTRY_ENV: str(registry), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _records(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a writer may be half-way through the last one)."""
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _ok_records_per_case(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in out.glob("results.[0-9]*.jsonl"):
        for record in _records(path):
            if record["status"] == "ok":
                counts[record["id"]] = counts.get(record["id"], 0) + 1
    return counts


def _check_merged(out: Path) -> list[dict]:
    """The merged table: every case once, in CSV order; the good ones ok with verified outputs."""
    merged = _records(out / "results.jsonl")
    assert [r["id"] for r in merged] == ["a1", "a2", "a3", BAD_ID, "d1", "e1"]
    by_id = {r["id"]: r for r in merged}
    for case_id in GOOD_IDS:
        record = by_id[case_id]
        assert record["status"] == "ok" and record["error"] is None, record
        assert record["outputs"], record
        for name, digest in record["outputs"].items():
            assert sha256_file(out / case_id / name) == digest
    bad = by_id[BAD_ID]
    assert bad["status"] == "failed" and "constant" in bad["error"] and "\n" not in bad["error"]
    assert not (out / BAD_ID / "transform.tfm").exists()  # a failed case writes nothing
    assert set(by_id["a1"]["outputs"]) == {"transform.tfm", "affine.json"}
    assert "warped.nii.gz" in by_id["a3"]["outputs"]
    assert "dice_after" in by_id["a2"]["metrics"] and "mean_dice" in by_id["e1"]["metrics"]
    assert "folding_percent" in by_id["d1"]["metrics"]
    return merged


def test_one_process_records_every_case_and_resume_skips_the_verified_ones(cohort, tiny_registry, tmp_path, capsys, monkeypatch):
    from diffusionreg.cli import main

    monkeypatch.setenv(REGISTRY_ENV, str(tiny_registry))
    out = tmp_path / "out"
    code = main(["batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "none"])
    assert code == 1  # one case failed; the others ran
    captured = capsys.readouterr()
    assert f"(id {BAD_ID}) failed: moving image is constant" in captured.err
    assert "6 cases: 5 ok, 1 failed or not run; 6 run now on 1 process" in captured.out
    merged = _check_merged(out)
    # nothing lost: the folder of a run is continued on purpose only
    assert main(["batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "none"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    # a tampered output is not "complete": that case (and the failed one) run again, no other
    (out / "a1" / "affine.json").write_text("{}")
    code = main(["batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "none", "--resume"])
    assert code == 1 and "2 run now" in capsys.readouterr().out
    assert _ok_records_per_case(out) == {"a1": 2, "a2": 1, "a3": 1, "d1": 1, "e1": 1}
    again = _check_merged(out)
    assert [r["finished"] for r in again if r["id"] not in ("a1", BAD_ID)] == [
        r["finished"] for r in merged if r["id"] not in ("a1", BAD_ID)
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("midline,m1,fixed.nii.gz,moving0.nii.gz", "row 3 (id m1): column fixed is not an option of 'diffusionreg midline'"),
        ("register,r1,fixed.nii.gz,moving0.nii.gz", "row 3 (id r1): unknown task 'register'; use affine, deformable, midline"),
        ("affine,x1,fixed.nii.gz,missing.nii.gz", "row 3 (id x1): --moving "),
        ("affine,x1,fixed.nii.gz,moving0.nii.gz,abc", "row 3 (id x1): argument --steps: invalid int value: 'abc'"),
        ("affine,a1,fixed.nii.gz,moving0.nii.gz", "row 3: id a1 is also the id of row 2"),
        ("affine,x/1,fixed.nii.gz,moving0.nii.gz", "row 3 (id x/1): id 'x/1' must be"),
        ("affine,x1,fixed.nii.gz,moving0.nii.gz,,out.png", "row 3 (id x1): --output-transform"),
        ("evaluate,x1,fixed.nii.gz,moving0.nii.gz", "row 3 (id x1): column fixed is not an option of 'diffusionreg evaluate'"),
        ("affine,x1,fixed.nii.gz,moving0.nii.gz,,,cpu", "row 3 (id x1): column device is set once for the whole batch"),
        ("affine,x1,fixed.nii.gz,moving0.nii.gz,,,,no-such-model", "row 3 (id x1): unknown model 'no-such-model'"),
    ],
)
def test_a_bad_row_is_refused_with_its_row_number_before_anything_runs(
    cohort, tiny_registry, row, message, tmp_path, capsys, monkeypatch
):
    from diffusionreg.cli import main

    monkeypatch.setenv(REGISTRY_ENV, str(tiny_registry))
    jobs = cohort.parent / "bad_rows.csv"
    jobs.write_text(
        "task,id,fixed,moving,steps,output_transform,device,model\naffine,a1,fixed.nii.gz,moving0.nii.gz,,,,tiny-affine\n"
        + row
        + "," * (7 - row.count(","))
        + "\n"
    )
    out = tmp_path / "out"
    assert main(["batch", "--jobs", str(jobs), "--output-dir", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing written, not even the output folder


def _torchrun(cohort: Path, out: Path, registry: Path, *extra: str, pause: float = 0.0) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "diffusionreg", "batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "json",
               *extra]  # fmt: skip
    env = _env(registry, **({PAUSE_BEFORE_RENAME_ENV: str(pause)} if pause else {}))
    # own session: the test ends what it started by process group, and kills one rank by its pid
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_two_gloo_ranks_kill_one_mid_run_then_resume_finishes_without_redoing(cohort, tiny_registry, tmp_path):
    out = tmp_path / "out"
    # each output rename waits, so the cases last long enough to kill a rank between two of them
    run = _torchrun(cohort, out, tiny_registry, pause=1.0)
    deadline = time.monotonic() + 240
    victim = None
    while time.monotonic() < deadline and run.poll() is None and victim is None:
        for path in out.glob("results.[0-9]*.jsonl") if out.is_dir() else ():
            lines = _records(path)
            if lines and lines[0]["rank"] == 1:
                victim = lines[0]["pid"]
        time.sleep(0.1)
    assert victim is not None and run.poll() is None, "no rank-1 case finished before the run ended: " + (
        run.communicate()[1][-3000:] if run.poll() is not None else "timed out"
    )
    os.kill(victim, signal.SIGKILL)  # no clean-up at all on that rank; torchrun stops the other
    try:
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    before = _ok_records_per_case(out)
    assert 1 <= sum(before.values()) < len(GOOD_IDS) and all(n == 1 for n in before.values()), before
    assert not (out / "results.jsonl").exists()  # merged only at the end of a run
    stamps = {case_id: (out / case_id / "transform.tfm").stat().st_mtime_ns for case_id in before if case_id[0] == "a"}

    resumed = _torchrun(cohort, out, tiny_registry, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode != 0, "the bad case fails again, so the exit code is not 0"  # torchrun: 1
    assert f"(id {BAD_ID}) failed: moving image is constant" in stderr
    # every good case done exactly once over both runs; the finished ones untouched
    assert _ok_records_per_case(out) == dict.fromkeys(GOOD_IDS, 1)
    assert {c: (out / c / "transform.tfm").stat().st_mtime_ns for c in stamps} == stamps
    merged = _check_merged(out)
    assert {r["rank"] for r in merged if r["status"] == "ok"} == {0, 1}
    progress = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"stage": "batch"')]
    assert progress[0]["fraction"] == 0.0 and progress[-1]["fraction"] == 1.0  # rank 0's bar over the cohort
    assert f"6 cases: 5 ok, 1 failed or not run; {6 - sum(before.values())} run now on 2 processes" in stdout


def test_sigterm_stops_the_cohort_keeps_finished_cases_and_the_case_in_flight_writes_nothing(cohort, tiny_registry, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "diffusionreg", "batch", "--jobs", str(cohort), "--output-dir", str(out),
               "--progress", "none"]  # fmt: skip
    run = subprocess.Popen(command, cwd=REPO, env=_env(tiny_registry, **{PAUSE_BEFORE_RENAME_ENV: "1.0"}),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and not (out.is_dir() and _ok_records_per_case(out)):
        time.sleep(0.05)
    assert run.poll() is None, run.communicate()[1][-2000:]
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "cancelled" in stderr, stderr
    finished = _ok_records_per_case(out)
    assert finished and all(n == 1 for n in finished.values())
    for folder in out.iterdir():
        if folder.is_dir() and folder.name not in finished:
            assert not [p.name for p in folder.iterdir()], f"case {folder.name} was not finished but wrote files"
