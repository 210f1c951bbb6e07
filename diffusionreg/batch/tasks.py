"""What the batch calls, per task: the steps of the single command, and the outputs it always names.

Each registration command is split into check (declare outputs, check options), read (inputs),
load (the model) and finish (register with a loaded model, write, commit), so the batch checks a
row without running it, reads inputs ahead and loads a model once per process. ``evaluate`` has
no model and runs as its own command on the main thread.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real

from diffusionreg.progress import Progress

#: Tasks a cohort row may name.
BATCH_TASKS = ("affine", "deformable", "evaluate")
#: Tasks of the issue that this version's backend does not run (refused when the CSV is checked).
UNAVAILABLE_TASKS = ("midline",)


@dataclass(frozen=True)
class TaskSteps:
    """How the batch runs one task through its single command's functions."""

    #: Output options the batch always writes (flag name -> file name in OUT/<case id>/) unless a
    #: column names them: the required outputs and the JSON the metrics come from.
    default_outputs: dict[str, str]
    #: Declare outputs and check options (raises InputError); the returned OutputSet is dropped.
    check: Callable[[argparse.Namespace], object]
    #: (args, inputs, model, progress) -> metrics; writes and commits the case's outputs.
    run: Callable[[argparse.Namespace, object, object, Progress], dict]
    #: Read the inputs (on the read-ahead thread); None: ``run`` reads them itself.
    read: Callable[[argparse.Namespace], object] | None = None
    #: Load the model on a device; None: the task has no model.
    load: Callable[[argparse.Namespace, object], object] | None = None
    #: The options that pick the model: cases with equal keys share one loaded model.
    model_options: tuple[str, ...] = field(default_factory=tuple)

    def model_key(self, args: argparse.Namespace) -> tuple:
        return tuple(getattr(args, name) for name in self.model_options)


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a result dict, nested names joined by '.'.

    Per-label tables (dicts keyed by label numbers) are left out: the summary averages scalars.
    """
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, Real) and math.isfinite(float(value)):
            flat[name] = float(value)
        elif isinstance(value, dict) and value and not all(str(k).lstrip("-").isdigit() for k in value):
            flat.update(numbers(value, f"{name}."))
    return flat


# --- affine ------------------------------------------------------------------------------------
def _affine_check(args):
    from diffusionreg.affine.commands import prepare_affine

    return prepare_affine(args, None)


def _affine_run(args, inputs, model, progress) -> dict:
    from diffusionreg.affine.commands import finish_affine, prepare_affine

    with prepare_affine(args, progress) as outputs:
        result, report = finish_affine(args, outputs, inputs, model, progress)
    return {"seconds": result.seconds, **numbers(report)}


def _affine_read(args):
    from diffusionreg.affine.commands import read_affine_inputs

    return read_affine_inputs(args)


def _affine_load(args, device):
    from diffusionreg.affine.commands import load_affine_model

    return load_affine_model(args, device)


# --- deformable --------------------------------------------------------------------------------
def _deformable_check(args):
    from diffusionreg.deformable.commands import prepare_deformable

    return prepare_deformable(args, None)


def _deformable_run(args, inputs, model, progress) -> dict:
    from diffusionreg.deformable.commands import finish_deformable, prepare_deformable

    with prepare_deformable(args, progress) as outputs:
        result, report = finish_deformable(args, outputs, inputs, model, progress)
    return {**numbers(result.metrics), **numbers(report)}


def _deformable_read(args):
    from diffusionreg.deformable.commands import read_deformable_inputs

    return read_deformable_inputs(args)


def _deformable_load(args, device):
    from diffusionreg.deformable.commands import load_deformable_model

    return load_deformable_model(args, device)


# --- evaluate ----------------------------------------------------------------------------------
def _evaluate_check(args) -> None:
    from diffusionreg.evaluation import parse_label_list

    if args.labels is not None:
        parse_label_list(args.labels)


def _evaluate_run(args, inputs, model, progress) -> dict:
    args.handler(args, progress)  # the command itself: reads, evaluates, writes --output-json
    return numbers(json.loads(args.output_json.read_text(encoding="utf-8")))


STEPS: dict[str, TaskSteps] = {
    "affine": TaskSteps(
        default_outputs={"output-transform": "transform.tfm", "output-json": "affine.json"},
        check=_affine_check,
        run=_affine_run,
        read=_affine_read,
        load=_affine_load,
        model_options=("model", "modality"),
    ),
    "deformable": TaskSteps(
        default_outputs={"output-transform": "field.nii.gz", "output-json": "deformable.json"},
        check=_deformable_check,
        run=_deformable_run,
        read=_deformable_read,
        load=_deformable_load,
        model_options=("model", "method", "modality"),
    ),
    "evaluate": TaskSteps(
        default_outputs={"output-json": "evaluation.json"},
        check=_evaluate_check,
        run=_evaluate_run,
    ),
}
