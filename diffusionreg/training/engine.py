"""The training loop every network shares (MONAI's Workflow -> Trainer pattern, without ignite).

A training supplies a :class:`TrainingTask`: the network, the optimiser and the *iteration*,
plus, optionally, a learning-rate factor, an EMA, a validation function and handlers. The
iteration is either one ``step(module, generator) -> (loss, stats)`` that draws a batch with the
given per-rank generator and returns the loss of the (DDP-wrapped) module (such trainings run on
the CPU), or a pair ``draw(generator) -> batch`` (CPU tensors, every random number of the step)
and ``loss(module, batch) -> (loss, stats)``. A split iteration runs on any device (the engine
moves the batch) and can draw its batches in worker processes ahead of the optimiser
(``--data-workers``). :func:`run_training` owns everything else:

- the ``torchrun`` process group (gloo) and DDP, one generator per rank (``seed + 1000 rank``);
- the device (``--device``), and the batch workers of a split iteration (:mod:`.batches`);
- resume from ``checkpoint.pt`` (model, EMA, optimiser, schedule, counters, every rank's RNG), so a
  resumed run continues exactly as an uninterrupted one would;
- backward, gradient clipping, optimiser and schedule steps, EMA update;
- decisions taken together by all ranks: the checkpoint tick (minutes or steps) and ``max_minutes``;
- validation on rank 0 every ``val_every`` steps and at the end, with the best model (lowest
  ``task.score``) exported to ``best/`` with a card stub and entered into a Models.json;
- ``model.safetensors`` + ``config.json`` (the EMA weights when there is an EMA) at every checkpoint;
- handlers: ``history.jsonl`` and :class:`~diffusionreg.progress.Progress` (tqdm / JSON / none).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusionreg.distributed import (
    any_rank,
    end_process_group,
    gather_to_all,
    rank_and_world,
    start_process_group,
)
from diffusionreg.errors import InputError
from diffusionreg.progress import Progress

from .batches import BatchSource, to_device, training_device
from .checkpoint import CHECKPOINT_NAME, TrainingState, load_checkpoint, save_checkpoint
from .ema import EMA
from .export import CardFacts, export_best, export_weights
from .handlers import Handler, HistoryWriter, ProgressReporter
from .options import RunOptions

#: Weight of the newest loss in the running average shown in progress and history.
LOSS_AVERAGE_WEIGHT = 0.02

Step = Callable[[nn.Module, torch.Generator], "tuple[torch.Tensor, dict]"]
Draw = Callable[[torch.Generator], Any]
Loss = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]


@dataclass
class TrainingTask:
    """What one training supplies to the engine (built after its data is loaded)."""

    name: str  # registry task and progress stage: "affine", "deformable", ...
    network: nn.Module  # the network whose weights are trained, saved and exported
    config_json: str  # the model config as written beside the weights (config.json)
    optimizer: torch.optim.Optimizer
    step: Step | None  # the iteration: batch from the generator -> (loss, stats); None: draw + loss
    seed: int  # base seed of the per-rank generators
    modality: str = "any"  # registry modality of the exported model
    modalities: tuple[str, ...] = ()  # every modality it serves, when several (registry ``modalities``)
    train_module: nn.Module | None = None  # what DDP wraps and ``step`` calls (default: network)
    lr_factor: Callable[[int], float] | None = None  # factor of the configured rate at a step
    ema: EMA | None = None  # averaged weights: validated and exported instead
    clip_grad_norm: float | None = None
    validate: Callable[[nn.Module], dict] | None = None  # rank 0; metrics of the exported weights
    score: Callable[[dict], float] | None = None  # lower is better; None: no best-model export
    description: str = ""  # first log line (data, parameters, config)
    data: list[str] = field(default_factory=list)  # training inputs, for the model card
    val_data: list[str] = field(default_factory=list)  # validation inputs, for the model card
    weights_metadata: dict = field(default_factory=dict)  # extra safetensors metadata (e.g. method)
    handlers: Sequence[Handler] = ()  # extra handlers (rank 0)
    draw: Draw | None = None  # split iteration: generator -> batch of CPU tensors (any process)
    loss: Loss | None = None  # split iteration: (module, batch on the module's device) -> (loss, stats)

    def __post_init__(self) -> None:
        single = self.step is not None and self.draw is None and self.loss is None
        split = self.step is None and self.draw is not None and self.loss is not None
        if not (single or split):
            raise ValueError(f"{self.name} training: give either step or both draw and loss")

    @property
    def exported(self) -> nn.Module:
        """The weights that are validated and exported: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.network


def run_training(task: TrainingTask, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train ``task`` for ``run.steps`` (under ``torchrun``: every rank calls this). Returns the last
    validation metrics with ``step``, ``loss_avg`` and ``elapsed_s``. Rank 0 writes ``run.output``."""
    if (run.output / CHECKPOINT_NAME).exists() and not run.resume:
        # nothing lost: a finished or interrupted run is continued on purpose or left alone
        raise InputError(f"{run.output} holds a training checkpoint: pass --resume to continue it or choose another --output")
    rank, world = rank_and_world()
    if run.threads:
        torch.set_num_threads(run.threads)
    owns_group = start_process_group(world)
    try:
        summary = _Engine(task, run, progress or Progress("none"), rank, world).run()
    except BaseException:
        end_process_group(owns_group, wait=False)
        raise
    end_process_group(owns_group)
    return summary


class _Engine:
    """One run of :func:`run_training` (state shared by the loop's phases)."""

    def __init__(self, task: TrainingTask, run: RunOptions, progress: Progress, rank: int, world: int) -> None:
        self.task, self.run_opts, self.progress, self.rank, self.world = task, run, progress, rank, world
        self.out = run.output
        self.generator = torch.Generator().manual_seed(task.seed + 1000 * rank)
        self.device = training_device(run.device, split=task.step is None, what=f"the {task.name} training")
        self.batches: BatchSource | None = None
        self.schedule = torch.optim.lr_scheduler.LambdaLR(task.optimizer, task.lr_factor) if task.lr_factor is not None else None
        self.state = TrainingState()
        self.metrics: dict = {}
        self.handlers: list[Handler] = []
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.handlers = [
                HistoryWriter(self.out, run.history_every),
                ProgressReporter(progress, f"train {task.name}", run.steps),
                *task.handlers,
            ]

    # ------------------------------------------------------------------ checkpoint
    def _resume(self) -> None:
        path = self.out / CHECKPOINT_NAME
        if not (self.run_opts.resume and path.exists()):
            return
        self.state, payload = load_checkpoint(path)
        self.task.network.load_state_dict(payload["model"])
        self.task.optimizer.load_state_dict(payload["optim"])
        if self.schedule is not None and payload.get("lr_schedule") is not None:
            self.schedule.load_state_dict(payload["lr_schedule"])
        elif self.schedule is not None:
            # a checkpoint of a run that had no schedule: the schedule takes over at its step
            self.schedule.last_epoch = self.state.step
            for group, base in zip(self.task.optimizer.param_groups, self.schedule.base_lrs):
                group["lr"] = base * self.task.lr_factor(self.state.step)
        if self.task.ema is not None and payload.get("ema") is not None:
            self.task.ema.load_state_dict(payload["ema"])
        states = payload["rng"]
        self.generator.set_state(states[self.rank % len(states)])  # a run may resume on fewer ranks

    def _save(self) -> None:
        """Every rank: gather the generators; rank 0 writes the checkpoint and the latest weights."""
        rng = gather_to_all(self.generator.get_state(), self.world)
        if self.rank != 0:
            return
        task = self.task
        tensors = {
            "model": task.network.state_dict(),
            "optim": task.optimizer.state_dict(),
            "rng": rng,
            "lr_schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "ema": task.ema.state_dict() if task.ema is not None else None,
        }
        save_checkpoint(self.out / CHECKPOINT_NAME, self.state, tensors, json.loads(task.config_json))
        export_weights(
            task.exported,
            task.config_json,
            self.out,
            "model",
            {"task": task.name, "step": self.state.step, **task.weights_metadata},
        )

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Rank 0: metrics of the exported weights; a new best is exported and registered."""
        task, state = self.task, self.state
        if self.rank != 0 or task.validate is None:
            return
        metrics = dict(task.validate(task.exported))
        metrics.update(step=state.step, loss_avg=state.loss_avg, elapsed_s=round(state.elapsed_s, 1))
        self.metrics = metrics
        for handler in self.handlers:
            handler.validated(state, metrics)
        if task.score is None:
            return
        score = float(task.score(metrics))
        if score < state.best:
            state.best, state.best_step = score, state.step
            run = self.run_opts
            facts = CardFacts(
                name=run.name or self.out.resolve().name,
                task=task.name,
                modality=task.modality,
                modalities=task.modalities,
                command=run.command or shlex.join(sys.argv),
                data=list(task.data),
                val_data=list(task.val_data),
                seed=task.seed,
                step=state.step,
                total_steps=run.steps,
                metrics=metrics,
            )
            export_best(
                task.exported,
                task.config_json,
                self.out,
                run.registry or self.out / "Models.json",
                facts,
                {"task": task.name, "step": state.step, "val": json.dumps(metrics), **task.weights_metadata},
            )

    # ------------------------------------------------------------------ loop
    def _iterate(self, module: nn.Module) -> None:
        """One optimisation step (the task's iteration, then backward and the updates)."""
        task, state = self.task, self.state
        if task.step is not None:
            loss, stats = task.step(module, self.generator)
        else:
            loss, stats = task.loss(module, to_device(self.batches.next(), self.device))
        task.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if task.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(task.network.parameters(), task.clip_grad_norm)
        task.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        state.step += 1
        if task.ema is not None:
            task.ema.update(task.network, state.step)
        state.loss = float(loss.detach())
        state.stats = {k: float(v) for k, v in stats.items()}
        state.loss_avg = (
            state.loss
            if state.loss_avg is None
            else (1 - LOSS_AVERAGE_WEIGHT) * state.loss_avg + LOSS_AVERAGE_WEIGHT * state.loss
        )

    def _place(self) -> None:
        """The trained network (inside ``train_module`` when there is one) and the EMA to the device;
        parameters move in place, so the optimiser's references stay valid."""
        for owner in (self.task.network, self.task.train_module, self.task.ema.averaged if self.task.ema else None):
            if owner is not None:
                owner.to(self.device)

    def run(self) -> dict:
        self._place()
        self._resume()
        task, run, state = self.task, self.run_opts, self.state
        if task.step is None:
            # workers seed from the start step, so a resumed run does not replay the first batches
            self.batches = BatchSource(task.draw, self.generator, run.data_workers, task.seed + 1000 * self.rank, state.step)
        module = task.train_module if task.train_module is not None else task.network
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(module)
        if self.rank == 0:
            self.progress.log(
                f"{task.name} training: {task.description}; world {self.world}; device {self.device}; "
                f"data workers {run.data_workers if task.step is None else 0}; start step {state.step}/{run.steps}"
            )
        for handler in self.handlers:
            handler.started(state)
        t0 = time.monotonic() - state.elapsed_s
        run_start = last_checkpoint = time.monotonic()
        module.train()
        try:
            while state.step < run.steps:
                self._iterate(module)
                state.elapsed_s = time.monotonic() - t0
                lr = task.optimizer.param_groups[0]["lr"]
                for handler in self.handlers:
                    handler.iteration_completed(state, lr)
                done = state.step >= run.steps
                out_of_time = any_rank(
                    run.max_minutes is not None and time.monotonic() - run_start > 60 * run.max_minutes, self.world
                )
                if (run.val_every and state.step % run.val_every == 0) or done or out_of_time:
                    self._validate()
                    module.train()
                tick = any_rank(
                    time.monotonic() - last_checkpoint > 60 * run.checkpoint_minutes
                    or (run.checkpoint_every > 0 and state.step % run.checkpoint_every == 0),
                    self.world,
                )
                if tick or done or out_of_time:
                    self._save()
                    last_checkpoint = time.monotonic()
                if out_of_time:
                    break
        finally:
            if self.batches is not None:
                self.batches.close()
        for handler in self.handlers:
            handler.completed(state)
        summary = dict(self.metrics)
        summary.update(step=state.step, loss_avg=state.loss_avg, elapsed_s=round(state.elapsed_s, 1))
        if self.rank == 0:
            self.progress.log("training finished: " + json.dumps(summary))
        return summary
