"""Cohort throughput: ``diffusionreg batch`` against a loop of single ``diffusionreg affine`` runs.

The same cases every time: the shipped sample pair (Resources/Sample, 2 mm brains) in both
directions, repeated to ``--cases`` cases, registered with the shipped ``brain-mri`` affine model
at its config's defaults (diffusion plus the mutual-information refinement of its config), with
the label maps so every case also reports Dice. Three ways, each at every setting of the threads
in total (``--threads``):

- ``loop``: one ``diffusionreg affine`` process per case, one after the other (a process start
  and a model load per case);
- ``batch1``: ``diffusionreg batch`` in one process (one model load, inputs read ahead);
- ``batch2``: ``torchrun --nproc-per-node 2 -m diffusionreg batch`` (gloo), each rank with half
  the threads.

The transforms of every mode are compared with the loop's (largest matrix difference).

    .venv/bin/python bench/batch.py [--cases 6] [--threads 2,1] [--modes loop,batch1,batch2] [--repeats 1]

Writes bench/out/batch/ (the cohort, every run's outputs) and bench/results/batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusionreg.transforms import read_transform

SAMPLE = ROOT / "Resources" / "Sample"
OUT = ROOT / "bench" / "out" / "batch"
RESULT = ROOT / "bench" / "results" / "batch.md"
MODEL = "brain-mri"
PAIRS = (("sample_fixed", "sample_moving"), ("sample_moving", "sample_fixed"))


def write_cohort(folder: Path, cases: int) -> Path:
    """The cohort CSV (absolute input paths) and the per-case options of the single commands."""
    rows = ["task,id,fixed,moving,model,fixed_labels,moving_labels"]
    for n in range(cases):
        fixed, moving = PAIRS[n % len(PAIRS)]
        rows.append(f"affine,c{n + 1},{SAMPLE / f'{fixed}.nii.gz'},{SAMPLE / f'{moving}.nii.gz'},{MODEL},"
                    f"{SAMPLE / f'{fixed}_labels.nii.gz'},{SAMPLE / f'{moving}_labels.nii.gz'}")  # fmt: skip
    jobs = folder / "cohort.csv"
    jobs.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return jobs


def single_commands(jobs: Path, out: Path) -> list[list[str]]:
    """One ``diffusionreg affine`` command line per CSV row, outputs as the batch names them."""
    lines = jobs.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    commands = []
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        (out / row["id"]).mkdir(parents=True)
        command = [sys.executable, "-m", "diffusionreg", "affine", "--progress", "none", "--quiet"]
        for name in ("fixed", "moving", "model", "fixed_labels", "moving_labels"):
            command += [f"--{name.replace('_', '-')}", row[name]]
        command += ["--output-transform", str(out / row["id"] / "transform.tfm")]
        command += ["--output-json", str(out / row["id"] / "affine.json")]
        commands.append(command)
    return commands


def timed(commands: list[list[str]], threads: int) -> tuple[float, list[int]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    codes = [subprocess.run(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode for c in commands]
    return time.perf_counter() - start, codes


def batch_command(jobs: Path, out: Path, processes: int) -> list[str]:
    tail = ["-m", "diffusionreg", "batch", "--jobs", str(jobs), "--output-dir", str(out), "--progress", "none"]
    if processes == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *tail]


def largest_difference(out: Path, reference: Path, ids: list[str]) -> float:
    """Largest |matrix difference| between a mode's transforms and the loop's, over all cases."""
    return max(float(np.abs(read_transform(out / i / "transform.tfm").matrix
                            - read_transform(reference / i / "transform.tfm").matrix).max()) for i in ids)  # fmt: skip


def registration_seconds(out: Path, ids: list[str]) -> float:
    """Seconds spent registering, summed over the cases (the ``seconds`` of each case's affine.json)."""
    return sum(json.loads((out / i / "affine.json").read_text())["seconds"] for i in ids)


def run_mode(mode: str, jobs: Path, out: Path, threads: int) -> tuple[float, int, str]:
    """Wall seconds of one mode over the cohort, its processes, and its command line as shown."""
    if mode == "loop":
        commands, processes = single_commands(jobs, out), 1
        seconds, codes = timed(commands, threads)
        shown = "for each row: " + " ".join(Path(a).name if "/" in a else a for a in commands[0][1:])
    else:
        processes = int(mode[len("batch") :])
        command = batch_command(jobs, out, processes)
        seconds, codes = timed([command], max(1, threads // processes))
        shown = " ".join(Path(a).name if "/" in a else a for a in command[1:])
    assert all(code == 0 for code in codes), f"{mode}: exit codes {codes}"
    return seconds, processes, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--threads", default="2,1",
                        help="settings of the threads in total, each split over the ranks of batch2 (at least 1 each)")  # fmt: skip
    parser.add_argument("--modes", default="loop,batch1,batch2")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the modes and thread settings")
    options = parser.parse_args()
    modes = options.modes.split(",")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    jobs = write_cohort(OUT, options.cases)
    ids = [f"c{n + 1}" for n in range(options.cases)]
    rows, shown = [], {}
    slot = 0
    for repeat in range(options.repeats):
        for threads in (int(t) for t in options.threads.split(",")):
            # the machine is shared: alternate the order so no mode always runs in the same slot
            for mode in modes if slot % 2 == 0 else modes[::-1]:
                out = OUT / f"{mode}-t{threads}-{repeat + 1}"
                load = os.getloadavg()[0]
                seconds, processes, shown[mode] = run_mode(mode, jobs, out, threads)
                rows.append({"mode": mode, "round": repeat + 1, "processes": processes, "load": load,
                             "threads": max(1, threads // processes), "seconds": seconds,
                             "registration_s": registration_seconds(out, ids), "out": out,
                             "cases_per_min": 60 * options.cases / seconds})  # fmt: skip
                print(f"{mode} ({processes} x {rows[-1]['threads']} threads) round {repeat + 1}: {seconds:.1f} s, "
                      f"{rows[-1]['cases_per_min']:.2f} cases/min (load {load:.1f})", flush=True)  # fmt: skip
            slot += 1
    reference = next((r["out"] for r in rows if r["mode"] == "loop"), None)
    for row in rows:
        if reference is not None:
            row["max_matrix_diff"] = largest_difference(row["out"], reference, ids)
    batch = next((r["out"] for r in rows if r["mode"] != "loop"), None)
    merged = [json.loads(x) for x in (batch / "results.jsonl").read_text().splitlines()] if batch else []
    dice = [r["metrics"]["dice_after"] for r in merged if "dice_after" in r["metrics"]]
    write_report(rows, shown, options, dice)


def write_report(rows: list[dict], shown: dict, options, dice: list[float]) -> None:
    best: dict[tuple[str, int], float] = {}
    for row in rows:
        key = (row["mode"], row["threads"] * row["processes"])
        best[key] = min(best.get(key, row["seconds"]), row["seconds"])
    lines = [
        "# Cohort throughput: `diffusionreg batch` vs a loop of single commands",
        "",
        f"{options.cases} affine cases (the sample pair of Resources/Sample, 2 mm brains, both directions), shipped "
        f"`{MODEL}` model at its config's defaults (diffusion + MI refinement), label maps given (Dice per case). "
        f"Thread settings {options.threads} (threads in total; batch2 gives each of its 2 ranks half, at least 1). "
        f"Machine: {os.cpu_count()} CPU cores "
        f"({platform.machine()}) shared with other work: the 1-minute load average at the start of each run is "
        "listed, and a run under load is slower for that reason alone. 'registration s' is the time inside "
        "the registration summed over the cases; the rest of the wall time is process starts, model loads, "
        "reading and writing.",
        "",
        "| mode | round | processes | threads each | load at start | wall s | registration s | cases/min | "
        "max matrix diff vs loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = f"{row['max_matrix_diff']:.1e}" if "max_matrix_diff" in row else "-"
        lines.append(f"| {row['mode']} | {row['round']} | {row['processes']} | {row['threads']} | {row['load']:.1f} | "
                     f"{row['seconds']:.1f} | {row['registration_s']:.1f} | {row['cases_per_min']:.2f} | {diff} |")  # fmt: skip
    if any(mode == "loop" for mode, _ in best):
        loop = min(seconds for (mode, _), seconds in best.items() if mode == "loop")
        lines += ["", "Best wall time per mode and threads in total (against the best loop): " + ", ".join(
            f"{mode} with {threads} {seconds:.1f} s ({loop / seconds:.2f}x)" for (mode, threads), seconds in best.items()) + "."]  # fmt: skip
    if dice:
        lines += ["", f"Mean Dice after registration over the cohort (batch): {np.mean(dice):.3f}."]
    lines += ["", f"Commands (`.venv/bin/python bench/batch.py --cases {options.cases} --threads {options.threads} "
              f"--repeats {options.repeats}`; OMP_NUM_THREADS set per process):", ""]  # fmt: skip
    lines += [f"- {mode}: `{text}`" for mode, text in shown.items()]
    RESULT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
