"""Resumable training state in ``checkpoint.pt``, written atomically, read with ``weights_only``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainingState:
    """Where a run stands: the counters the engine carries between steps and across a resume."""

    step: int = 0  # optimisation steps done
    elapsed_s: float = 0.0  # training wall time over all sessions, seconds
    best: float = float("inf")  # best validation score so far (lower is better)
    best_step: int = 0
    loss: float | None = None  # last step's loss
    loss_avg: float | None = None  # exponential average of the loss (factor 0.98)
    stats: dict = field(default_factory=dict)  # last step's extra numbers from the training's step


def save_checkpoint(path: Path, state: TrainingState, tensors: dict, config: dict) -> None:
    """Write ``tensors`` (state dicts: model, optimiser, ...; RNG states) with the counters and the
    config under a temporary name, then rename: a kill mid-write leaves the previous checkpoint."""
    payload = {
        **tensors,
        "step": state.step,
        "elapsed": state.elapsed_s,
        "best": state.best,
        "best_step": state.best_step,
        "loss_avg": state.loss_avg,
        "config": config,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[TrainingState, dict]:
    """The counters and the raw payload (state dicts) of a checkpoint (tensors only: weights_only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = TrainingState(
        step=int(payload["step"]),
        elapsed_s=float(payload["elapsed"]),
        best=float(payload.get("best", float("inf"))),
        best_step=int(payload.get("best_step", 0)),
        loss_avg=payload.get("loss_avg"),
    )
    return state, payload
