"""``diffusionreg batch`` with midline rows: a cohort of two phantom head CTs and one image that is
not a head CT, measured with the tiny midline model of ``test_midline_cli`` (a known uniform shift,
so the MLS each case must report is known); bad midline rows refused before anything runs; the same
cohort under ``torchrun --nproc-per-node 2`` (gloo on CPU).

No trained midline model ships, so every row names one (here a model folder beside the CSV).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_midline_cli import SHIFT_PX, tiny_midline_config, write_tiny_midline_model

from diffusionreg.image import Image, centred_grid, write_image
from diffusionreg.midline.phantom import phantom_head
from diffusionreg.registry import REGISTRY_ENV, sha256_file
from diffusionreg.spaces import homogeneous, rotation_about_axis

GOOD_IDS = ("m1", "m2")
BAD_ID = "bad"
HEADER = "task,id,input,model,output_landmarks,output_table"


def _record_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``cohort.csv``, the tiny model folder and three CTs beside it: m1 a phantom head in HU on an
    oblique grid, m2 another placement stored as HU + 1024 (and two more outputs), ``bad`` uniform
    noise (not a head CT: it passes the CSV check and fails when measured)."""
    folder = tmp_path_factory.mktemp("midline-cohort")
    write_tiny_midline_model(folder / "tiny-midline")
    grid = centred_grid((88, 100, 64), (2.0, 1.95, 2.5), (4.0, 14.0, 12.0), rotation_about_axis((0, 0, 1), -20.0))
    placements = (
        homogeneous(rotation_about_axis((0, 0, 1), 8.0), (4.0, -3.0, 2.0)),
        homogeneous(rotation_about_axis((0, 0, 1), -5.0), (2.0, 1.0, -1.0)),
    )
    write_image(phantom_head(grid, placements[0]), folder / "head1.nii.gz")
    write_image(phantom_head(grid, placements[1], offset_hu=1024.0), folder / "head2.nii.gz")
    noise = np.random.default_rng(0).uniform(0, 900, (40, 40, 40)).astype(np.float32)
    write_image(Image(noise, np.diag([4.0, 4.0, 4.0, 1.0])), folder / "mri.nii.gz")
    (folder / "cohort.csv").write_text(
        f"{HEADER}\n"
        "midline,m1,head1.nii.gz,tiny-midline,,\n"
        "midline,m2,head2.nii.gz,tiny-midline,landmarks.mrk.json,slices.csv\n"
        f"midline,{BAD_ID},mri.nii.gz,tiny-midline,,\n",
        encoding="utf-8",
    )
    return folder / "cohort.csv"


def _check_merged(out: Path) -> dict[str, dict]:
    """Every case once in CSV order; good cases ok with their outputs (and nothing else) in their
    folder and the measurement in their metrics; the bad one failed with one line, nothing written."""
    merged = _record_lines(out / "results.jsonl")
    assert [r["id"] for r in merged] == [*GOOD_IDS, BAD_ID]
    by_id = {r["id"]: r for r in merged}
    for case_id in GOOD_IDS:
        record = by_id[case_id]
        assert record["status"] == "ok" and record["error"] is None and record["task"] == "midline", record
        assert sorted(p.name for p in (out / case_id).iterdir()) == sorted(record["outputs"])  # no temporary left
        for name, digest in record["outputs"].items():
            assert sha256_file(out / case_id / name) == digest
        report = json.loads((out / case_id / "midline.json").read_text())
        metrics = record["metrics"]
        expected = SHIFT_PX * tiny_midline_config().frame.pixel_mm * report["pose_scale"]
        assert metrics["case_mls_mm"] == pytest.approx(report["case_mls_mm"]) == pytest.approx(expected, rel=1e-3)
        assert metrics["flag"] is report["flag"] and metrics["side"] == report["side"] == "right"
        assert metrics["seconds_total"] == pytest.approx(sum(report["seconds"].values()))
    assert set(by_id["m1"]["outputs"]) == {"midline.json"}
    assert set(by_id["m2"]["outputs"]) == {"midline.json", "landmarks.mrk.json", "slices.csv"}
    assert by_id["m1"]["metrics"]["hu_offset_removed"] is False and by_id["m2"]["metrics"]["hu_offset_removed"] is True
    bad = by_id[BAD_ID]
    assert bad["status"] == "failed" and "no air" in bad["error"] and "\n" not in bad["error"], bad
    assert not [p.name for p in (out / BAD_ID).iterdir()]  # a failed case writes nothing
    return by_id


def test_midline_cohort_in_one_process_matches_the_single_command(cohort, tiny_registry, tmp_path, capsys, monkeypatch):
    from diffusionreg.cli import main

    monkeypatch.setenv(REGISTRY_ENV, str(tiny_registry))
    out = tmp_path / "out"
    code = main(["batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "none", "--device", "cpu"])
    assert code == 1  # the bad case failed; the others ran
    captured = capsys.readouterr()
    assert f"row 4 (id {BAD_ID}) failed: " in captured.err and "no air" in captured.err
    assert "3 cases: 2 ok, 1 failed or not run; 3 run now on 1 process" in captured.out
    by_id = _check_merged(out)
    summary = next(line for line in captured.out.splitlines() if line.startswith("midline "))
    flagged = np.mean([by_id[case_id]["metrics"]["flag"] for case_id in GOOD_IDS])
    mls = np.mean([by_id[case_id]["metrics"]["case_mls_mm"] for case_id in GOOD_IDS])
    assert f"case_mls_mm {mls:.4g}, flag {flagged:.4g}, " in summary, summary  # mean flag: the fraction flagged
    # the batch's report is the single command's report (the measurement is deterministic)
    single = tmp_path / "single.json"
    model = str(cohort.parent / "tiny-midline")
    args = ["midline", "--input", str(cohort.parent / "head2.nii.gz"), "--output-json", str(single), "--model", model]
    assert main([*args, "--progress", "none", "--device", "cpu"]) == 0
    batch_report = json.loads((out / "m2" / "midline.json").read_text())
    single_report = json.loads(single.read_text())
    batch_report.pop("seconds"), single_report.pop("seconds")
    assert batch_report == single_report
    assert by_id["m2"]["metrics"]["case_mls_mm"] == single_report["case_mls_mm"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("midline,x1,head1.nii.gz,,,", "row 3 (id x1): no midline model registered for modality 'ct'; pass --model"),
        ("midline,x1,missing.nii.gz,tiny-midline,,", "row 3 (id x1): --input "),
        ("midline,x1,,tiny-midline,,", "row 3 (id x1): --input is required"),
        ("midline,x1,head1.nii.gz,tiny-midline,marks.json,", "row 3 (id x1): --output-landmarks"),
        ("midline,x1,head1.nii.gz,no-such-model,,", "row 3 (id x1): unknown model 'no-such-model'"),
    ],
)
def test_a_bad_midline_row_is_refused_with_its_row_number_before_anything_runs(
    cohort, tiny_registry, row, message, tmp_path, capsys, monkeypatch
):
    from diffusionreg.cli import main

    monkeypatch.setenv(REGISTRY_ENV, str(tiny_registry))  # registers no midline model
    jobs = cohort.parent / "bad_rows.csv"
    jobs.write_text(f"{HEADER}\nmidline,m1,head1.nii.gz,tiny-midline,,\n{row}\n")
    out = tmp_path / "out"
    assert main(["batch", "--jobs", str(jobs), "--output-dir", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing written, not even the output folder


def test_a_midline_row_takes_only_the_measurement_options(cohort, tiny_registry, tmp_path, capsys, monkeypatch):
    """``diffusionreg midline``'s parser also carries ``midline synth``'s options: not columns of a row."""
    from diffusionreg.cli import main

    monkeypatch.setenv(REGISTRY_ENV, str(tiny_registry))
    jobs = cohort.parent / "synth_column.csv"
    jobs.write_text("task,id,input,model,shift_mm\nmidline,x1,head1.nii.gz,tiny-midline,5\n")
    out = tmp_path / "out"
    assert main(["batch", "--jobs", str(jobs), "--output-dir", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "row 2 (id x1): column shift-mm is not an option of 'diffusionreg midline'" in err, err
    assert not out.exists()


@pytest.mark.slow
def test_midline_cohort_on_two_gloo_ranks(cohort, tiny_registry, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "diffusionreg", "batch", "--jobs", str(cohort), "--output-dir", str(out), "--progress", "none",
               "--device", "cpu"]  # fmt: skip
    env = {**os.environ, REGISTRY_ENV: str(tiny_registry), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, "the bad case failed, so the exit code is not 0"  # torchrun: 1
    assert f"(id {BAD_ID}) failed: " in done.stderr and "no air" in done.stderr
    assert "3 cases: 2 ok, 1 failed or not run; 3 run now on 2 processes" in done.stdout, done.stdout + done.stderr
    by_id = _check_merged(out)
    assert {r["rank"] for r in by_id.values()} == {0, 1}  # rank r took every 2nd case from the r-th
    assert sum(len(_record_lines(path)) for path in out.glob("results.[0-9]*.jsonl")) == 3  # each case once
