"""CLI: ``diffusionreg batch`` -- a cohort from a CSV, in one process or under ``torchrun``.

Under ``torchrun`` every rank reads and checks the whole CSV, rank 0 finds the cases already
complete (``--resume``) and shares that list, and the cases left are split by position: rank r
runs every ``world``-th of them from the r-th. The process group carries only that list, the
final wait and the exit code: gloo on CPU, NCCL when the ranks run on GPUs with one GPU per local
rank (gloo when local ranks share GPUs: NCCL refuses that). The output folder must be one folder
every rank sees (a shared file system across nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress
from diffusionreg.vocabulary import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK

#: How long a rank that finished its cases waits for the others (each collective's time limit). The
#: ranks' shares differ by at most a few cases, and torchrun ends the survivors when a rank dies.
RANK_WAIT = timedelta(hours=24)


def _epilog() -> str:
    import textwrap

    from .tasks import BATCH_TASKS, STEPS

    defaults = "; ".join(f"{task} {', '.join(STEPS[task].default_outputs.values())}" for task in BATCH_TASKS)
    paragraphs = (
        f"CSV columns: task ({', '.join(BATCH_TASKS)}), id (the case's folder OUT/<id>/), then any option of that "
        "task's command without its dashes, e.g. fixed, moving, model, refine_iterations, output_volume (a midline "
        "row: input, model and the midline outputs only). Empty cells leave an option "
        "unset; inputs are relative to the CSV's folder; outputs are file names in OUT/<id>/ (defaults: "
        f"{defaults}); switches take true/false; repeatable options take values separated by ';'. Every row is "
        "checked before anything runs: a bad row is reported with its row number (header = row 1), exit 2, "
        "nothing written.",
        "Writes OUT/<id>/ per case (all its outputs or none), OUT/results.<rank>.jsonl (one line per finished "
        "case) and, at the end, OUT/results.jsonl (every case: status, metrics, seconds, error, sha256 of its "
        "outputs) and a summary table. Exit 0 when every case succeeded, 1 when any case failed (the others "
        "still run), 2 for a bad CSV or option, 130 when cancelled (finished cases are kept; --resume continues).",
        "Several processes: torchrun --nproc-per-node N -m diffusionreg batch ... (see docs/batch.md).",
    )
    return "\n\n".join(textwrap.fill(paragraph, width=100) for paragraph in paragraphs)


def add_commands(commands, train_commands, common) -> None:
    """Register ``diffusionreg batch``."""
    p = commands.add_parser(
        "batch",
        parents=[common],
        help="run a cohort of affine/deformable/midline/evaluate cases from a CSV (one model load per process; torchrun)",
        description=(
            "Run every case of a cohort CSV with one model load per process, inputs read ahead, "
            "a record per case and resume; under torchrun the cases are split across the ranks."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--jobs", required=True, type=Path, help="cohort CSV: one case per row (columns below)")
    p.add_argument("--output-dir", required=True, type=Path, help="folder of the case folders and results (created)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run in --output-dir: skip the cases whose outputs are complete and verified (sha256)",
    )
    # The single commands' parsers, filled by the time a command runs: rows are parsed with them.
    p.set_defaults(handler=_run_batch, command_parsers=commands.choices)


def _run_batch(args: argparse.Namespace, progress: Progress) -> int:
    from diffusionreg.distributed import rank_and_world

    rank, world = rank_and_world()
    try:
        return _run(args, progress, rank, world)
    except InputError:
        if rank == 0:
            raise
        return EXIT_BAD_INPUT  # every rank checks the same CSV; one line from rank 0 is enough


def _run(args: argparse.Namespace, progress: Progress, rank: int, world: int) -> int:
    from diffusionreg.distributed import end_process_group, start_process_group

    from .jobs import read_cases
    from .results import rank_files

    out = args.output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {args.output_dir} is a file; give a folder")
    if not out.parent.is_dir():
        raise InputError(f"--output-dir {args.output_dir}: folder {out.parent} does not exist")
    cases = read_cases(args.jobs, out, args.command_parsers)
    if out.is_dir() and rank_files(out) and not args.resume:
        raise InputError(
            f"--output-dir {args.output_dir} holds the results of an earlier run: pass --resume to continue it "
            "or choose another folder"
        )
    device = _rank_device(args.device)
    out.mkdir(exist_ok=True)
    backend = _backend(device)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
    owns_group = start_process_group(world, backend, timeout=RANK_WAIT)
    try:
        code = _cohort(args, progress, cases, out, device, rank, world)
    except BaseException:
        end_process_group(owns_group, wait=False)
        raise
    end_process_group(owns_group, wait=False)
    return code


def _rank_device(name: str):
    """The device of this rank: ``auto``/``cuda`` mean the local rank's GPU under torchrun."""
    import torch

    from diffusionreg.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def _backend(device) -> str:
    """NCCL when every local rank has a GPU of its own; gloo on CPU and when ranks share a GPU
    (NCCL refuses two ranks on one device)."""
    import torch

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if device.type == "cuda" and local_ranks <= torch.cuda.device_count() else "gloo"


def _cohort(args, progress: Progress, cases, out: Path, device, rank: int, world: int) -> int:
    import torch.distributed as dist

    from diffusionreg.distributed import share_from_rank0

    from .cohort_progress import CohortProgress
    from .results import ResultLog, completed, merge, rank_file, summary
    from .runner import ModelCache, run_cases

    with contextlib.ExitStack() as stack:
        watcher = None
        done: set[int] = set()
        if rank == 0:
            done = completed(cases, out) if args.resume else set()
            stage = stack.enter_context(progress.stage("batch", total=len(cases)))
            if done:
                stage.update(len(done), message=f"{len(done)} complete from an earlier run")
            # line counts start now, before the other ranks get the list and write anything
            watcher = CohortProgress(stage, [rank_file(out, r) for r in range(world)])
        done = share_from_rank0(done, world)
        todo = [case for case in cases if case.index not in done]
        start = time.perf_counter()
        if watcher is not None:
            watcher.start()
            stack.callback(watcher.stop)

        def parse(case):
            return case.parse(args.command_parsers, str(device), args.overwrite)

        def failed(case, line: str) -> None:
            print(f"row {case.row} (id {case.id}) failed: {line}", file=sys.stderr, flush=True)

        run_cases(todo[rank::world], parse, out, ResultLog(out, rank), ModelCache(device), failed)
        if world > 1:
            dist.barrier()  # every rank's records are on disk
    code = EXIT_OK
    if rank == 0:
        merged = merge(cases, out)
        progress.log(summary(merged, len(todo), (time.perf_counter() - start) / 60, world))
        code = EXIT_OK if all(r["status"] == "ok" for r in merged) else EXIT_FAILURE
    return share_from_rank0(code, world)
