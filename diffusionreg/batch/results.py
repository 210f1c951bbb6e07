"""The record of a cohort: one JSON line per finished case, per rank; the merged table; the summary.

Each rank appends to ``OUT/results.<rank>.jsonl`` (flushed and synced line by line, after the
case's outputs are committed), so a killed run loses at most the cases in flight; a line cut
short by the kill is ignored. A record holds ``id``, ``row``, ``task``, ``status`` (``ok`` or
``failed``), ``error`` (one line or null), ``metrics`` (numbers; a midline case also its flag and
side), ``seconds``, ``outputs`` (file name -> sha256), ``digest`` (of the CSV row), ``rank``,
``host``, ``pid`` and ``finished`` (Unix time). A case is complete when its latest record is ``ok`` for the same row and every
output it lists still has that sha256; ``--resume`` skips exactly those. Rank 0 merges the rank
files into ``OUT/results.jsonl``: the latest record of every case, in CSV order.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffusionreg.io_atomic import atomic_output
from diffusionreg.registry import sha256_file

from .jobs import Case
from .tasks import STEPS

MERGED_NAME = "results.jsonl"
RANK_PATTERN = "results.*.jsonl"


def rank_file(out: Path, rank: int) -> Path:
    return out / f"results.{rank}.jsonl"


def rank_files(out: Path) -> list[Path]:
    """Every rank's results file in ``out`` (of this run and of earlier runs of any size)."""
    return sorted(p for p in out.glob(RANK_PATTERN) if p.name.split(".")[1].isdigit())


class ResultLog:
    """Appends this rank's records, each on disk before the next case starts."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = rank_file(out, rank)
        self.rank = rank

    def append(
        self, case: Case, status: str, *, error: str | None, metrics: dict, seconds: float, outputs: dict[str, str]
    ) -> dict:
        record = {
            "id": case.id,
            "row": case.row,
            "task": case.task,
            "status": status,
            "error": error,
            "metrics": metrics,
            "seconds": round(seconds, 3),
            "outputs": outputs,
            "digest": case.digest,
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "finished": time.time(),
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record


def output_digests(paths: Iterable[Path]) -> dict[str, str]:
    """File name -> sha256 of a case's outputs (all in the case folder)."""
    return {path.name: sha256_file(path) for path in paths}


def read_records(paths: Iterable[Path]) -> list[dict]:
    """The complete records of results files (a line cut short by a kill is skipped)."""
    records = []
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    continue  # the last line of a killed writer
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def latest(records: Iterable[dict]) -> dict[str, dict]:
    """The latest record of each case id."""
    newest: dict[str, dict] = {}
    for record in records:
        known = newest.get(record["id"])
        if known is None or record["finished"] >= known["finished"]:
            newest[record["id"]] = record
    return newest


def completed(cases: Sequence[Case], out: Path) -> set[int]:
    """Indices of the cases whose outputs are complete and verified (see the module docstring)."""
    newest = latest(read_records(rank_files(out)))
    done = set()
    for case in cases:
        record = newest.get(case.id)
        if record is None or record["status"] != "ok" or record["digest"] != case.digest or not record["outputs"]:
            continue
        folder = out / case.id
        if all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in record["outputs"].items()):
            done.add(case.index)
    return done


def merge(cases: Sequence[Case], out: Path) -> list[dict]:
    """Write ``OUT/results.jsonl`` (atomically): the latest record of every case, CSV order.

    A case with no record (a run stopped before it) gets ``status: "not run"``.
    """
    newest = latest(read_records(rank_files(out)))
    merged = [
        newest.get(case.id)
        or {"id": case.id, "row": case.row, "task": case.task, "status": "not run", "error": None, "metrics": {}, "outputs": {}}
        for case in cases
    ]
    with atomic_output(out / MERGED_NAME) as temporary:
        temporary.write_text("".join(json.dumps(record) + "\n" for record in merged), encoding="utf-8")
    return merged


def summary(merged: Sequence[dict], ran: int, minutes: float, world: int) -> str:
    """Cases, failures, mean metrics per task and throughput of this run (cases per minute)."""
    ok = [r for r in merged if r["status"] == "ok"]
    failed = [r for r in merged if r["status"] != "ok"]
    lines = [
        f"{len(merged)} cases: {len(ok)} ok, {len(failed)} failed or not run; "
        f"{ran} run now on {world} process{'es' if world > 1 else ''}"
    ]
    if minutes > 0 and ran:
        lines[0] += f" in {minutes:.2f} min = {ran / minutes:.2f} cases/min"
    lines.append(f"{'task':<11} {'cases':>5} {'ok':>4} {'failed':>6}  mean metrics (ok cases)")
    for task in dict.fromkeys(r["task"] for r in merged):
        rows = [r for r in merged if r["task"] == task]
        good = [r for r in rows if r["status"] == "ok"]
        keys = [k for k in STEPS[task].summary_metrics if any(k in r["metrics"] for r in good)]
        means = ", ".join(f"{k} {statistics.fmean(r['metrics'][k] for r in good if k in r['metrics']):.4g}" for k in keys)
        lines.append(f"{task:<11} {len(rows):>5} {len(good):>4} {len(rows) - len(good):>6}  {means or '-'}")
    for record in failed:
        lines.append(
            f"row {record['row']} (id {record['id']}): {record['status']}"
            + (f": {record['error']}" if record.get("error") else "")
        )
    return "\n".join(lines)
