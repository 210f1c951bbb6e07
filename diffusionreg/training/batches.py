"""Where a training's batches come from and where its arithmetic runs.

A split iteration (``draw`` + ``loss``, see :mod:`.engine`) draws every random number of a step on
the CPU with a ``torch.Generator``, so the same seed gives the same batches on any device. The
batches are drawn either in the training loop, from the rank's own generator (a resumed run then
repeats an uninterrupted one exactly), or by ``workers`` processes ahead of the optimiser. Batch
synthesis (slicing, resampling and corrupting volumes) is the slow part of our trainings once the
network runs on a GPU: a midline diffusion batch takes ~0.1 s of one CPU core, an affine batch
~0.25 s, against a few milliseconds for the network's step.

Workers each own a generator seeded from (seed, start step, worker index), and the loader takes
their batches in turn, so a run with workers is deterministic for a given worker count, and a
resumed one continues with fresh batches rather than the first ones again; it is not the same
sequence as a run without workers.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from diffusionreg.devices import resolve_device
from diffusionreg.errors import InputError

#: Batches each worker keeps ready (DataLoader's ``prefetch_factor``).
PREFETCH_PER_WORKER = 4


def training_device(name: str, split: bool, what: str) -> torch.device:
    """The device of a training: ``name`` as ``--device`` gives it (``auto``: the first GPU).

    A training with a single ``step`` (not split into draw and loss) builds its tensors on the
    CPU: ``auto`` keeps it there, an explicit GPU is refused with the reason."""
    device = resolve_device(name)
    if device.type == "cpu" or split:
        return device
    if name == "auto":
        return torch.device("cpu")
    raise InputError(f"{what} runs on the CPU only; use --device cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (tuples, lists, dicts, dataclasses) on ``device``."""
    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **moved)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def worker_seed(seed: int, start_step: int, worker: int) -> int:
    """A well-mixed 63-bit seed for one worker of a run that starts (or resumes) at ``start_step``."""
    return int(np.random.SeedSequence([seed, start_step, worker]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _DrawStream(IterableDataset):
    """An endless stream of ``draw(generator)`` batches, one generator per worker."""

    def __init__(self, draw: Callable[[torch.Generator], Any], seed: int, start_step: int) -> None:
        self.draw, self.seed, self.start_step = draw, seed, start_step

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # the workers together fill the machine; intra-op threads in each would oversubscribe it
        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(worker_seed(self.seed, self.start_step, worker))
        while True:
            yield self.draw(generator)


class BatchSource:
    """Batches of a split iteration: drawn in the loop (``workers`` 0) or by worker processes."""

    def __init__(
        self,
        draw: Callable[[torch.Generator], Any],
        generator: torch.Generator,
        workers: int,
        seed: int,
        start_step: int,
    ) -> None:
        self.draw, self.generator = draw, generator
        self._iterator: Iterator[Any] | None = None
        if workers > 0:
            if "fork" not in multiprocessing.get_all_start_methods():
                # the draw closes over loaded volumes: workers must inherit them, not unpickle them
                raise InputError("--data-workers needs a platform that can fork processes; use --data-workers 0")
            loader = DataLoader(
                _DrawStream(draw, seed, start_step),
                batch_size=None,
                num_workers=workers,
                prefetch_factor=PREFETCH_PER_WORKER,
                multiprocessing_context="fork",
            )
            self._iterator = iter(loader)

    def next(self) -> Any:
        """The next batch (CPU tensors)."""
        if self._iterator is None:
            return self.draw(self.generator)
        return next(self._iterator)

    def close(self) -> None:
        """Stop the workers (the loader's iterator shuts them down when released)."""
        self._iterator = None
