"""Run settings shared by every training, and the command-line flags that fill them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from diffusionreg.devices import check_device_name
from diffusionreg.errors import InputError


@dataclass
class RunOptions:
    """How long and how a training runs, where it writes, how often it checkpoints and validates.

    Times are wall-clock minutes; intervals are optimisation steps (0 = never by count).
    """

    output: Path  # run folder: checkpoint.pt, model.safetensors, best/, ...
    steps: int = 1000  # total optimisation steps (a resumed run continues to it)
    resume: bool = False  # continue from output/checkpoint.pt when it exists
    checkpoint_minutes: float = 4.0  # checkpoint tick by wall time ...
    checkpoint_every: int = 0  # ... and/or every this many steps
    val_every: int = 250  # validation interval (always at the end as well)
    max_minutes: float | None = None  # stop cleanly (validation + checkpoint) after this wall time
    threads: int | None = None  # torch CPU threads per process
    device: str = "auto"  # auto | cpu | cuda[:N]; auto: the GPU when the training can use one
    data_workers: int = 0  # processes drawing batches ahead of the optimiser (0: drawn in the loop)
    history_every: int = 25  # history line interval (and the first step)
    registry: Path | None = None  # Models.json receiving the best model (default output/Models.json)
    name: str | None = None  # registry name of the best model (default: the output folder's name)
    command: str | None = None  # for the model card (default: this process's command line)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.steps < 1:
            raise InputError("--steps must be >= 1")
        for flag, value in (
            ("--checkpoint-every", self.checkpoint_every),
            ("--val-every", self.val_every),
            ("--history-every", self.history_every),
            ("--data-workers", self.data_workers),
        ):
            if value < 0:
                raise InputError(f"{flag} must be >= 0")
        check_device_name(self.device)
        if self.checkpoint_minutes <= 0:
            raise InputError("--checkpoint-minutes must be > 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise InputError("--max-minutes must be > 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """From the flags added by :func:`add_run_arguments`."""
        return cls(
            output=args.output,
            steps=args.steps,
            resume=args.resume,
            checkpoint_minutes=args.checkpoint_minutes,
            checkpoint_every=args.checkpoint_every,
            val_every=args.val_every,
            max_minutes=args.max_minutes,
            threads=args.threads,
            device=args.device,  # the common --device option of every command
            data_workers=args.data_workers,
            registry=args.registry,
            name=args.name,
        )


def add_run_arguments(parser: argparse.ArgumentParser, val_every: int) -> None:
    """The run flags of every ``train`` sub-command (``val_every``: this training's default)."""
    parser.add_argument(
        "--output", required=True, type=Path, help="run folder (checkpoint.pt, model.safetensors, best/, history.jsonl)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=4.0, help="checkpoint interval in wall-clock minutes (default 4)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default 0: by time only)")
    parser.add_argument(
        "--val-every", type=int, default=val_every, help=f"validation interval in steps (default {val_every}; always at the end)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop cleanly (validation, checkpoint, export) after this wall time"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="processes that draw training batches ahead of the optimiser (default 0: drawn in the loop, "
        "so a resumed run repeats an uninterrupted one exactly; with workers it is deterministic but not identical)",
    )
    parser.add_argument(
        "--registry", type=Path, default=None, help="Models.json that receives the best model (default OUTPUT/Models.json)"
    )
    parser.add_argument("--name", default=None, help="registry name of the best model (default: the output folder's name)")


def with_overrides(config, **values):
    """``config`` (a dataclass) with the command-line overrides that were given (not None)."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})
