"""What the batch calls, per task: the steps of the single command, and the outputs it always names.

Each registration command and the midline measurement are split into check (declare outputs,
check options), read (inputs), load (the model) and finish (register or measure with a loaded
model, write, commit), so the batch checks a row without running it, reads inputs ahead and loads
a model once per process. ``evaluate`` has no model and runs as its own command on the main thread.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real

from diffusionreg import models
from diffusionreg.affine.commands import finish_affine, load_affine_model, prepare_affine
from diffusionreg.deformable.commands import finish_deformable, load_deformable_model, prepare_deformable
from diffusionreg.midline.measure_command import OUTPUT_FLAGS as MIDLINE_OUTPUT_FLAGS
from diffusionreg.midline.measure_command import finish_measure, load_measure_model, prepare_measure, read_measure_input
from diffusionreg.pair_inputs import read_pair_inputs
from diffusionreg.progress import Progress

#: Tasks a cohort row may name.
BATCH_TASKS = ("affine", "deformable", "midline", "evaluate")


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
    #: Metrics the summary table averages, when the cases have them (results.jsonl keeps them all).
    summary_metrics: tuple[str, ...] = field(default_factory=tuple)
    #: The options a row may set (without dashes); None: every option of the command. For a
    #: command whose parser also carries another mode's options (``midline synth``).
    columns: tuple[str, ...] | None = None

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
    models.resolve(args.model, "affine", args.modality)  # the model is found (not loaded)
    return prepare_affine(args, None)


def _affine_run(args, inputs, model, progress) -> dict:
    with prepare_affine(args, progress) as outputs:
        result, report = finish_affine(args, outputs, inputs, model, progress)
    return {"seconds": result.seconds, **numbers(report)}


# --- deformable --------------------------------------------------------------------------------
def _deformable_check(args):
    if args.model is not None:  # the model is found (not loaded); the default is picked when loading
        models.resolve(args.model, "deformable", args.modality)
    return prepare_deformable(args, None)


def _deformable_run(args, inputs, model, progress) -> dict:
    with prepare_deformable(args, progress) as outputs:
        result, report = finish_deformable(args, outputs, inputs, model, progress)
    return {**numbers(result.metrics), **numbers(report)}


# --- midline ----------------------------------------------------------------------------------
def _midline_check(args):
    from diffusionreg.midline.model_loading import MODALITY, TASK

    models.resolve(args.model, TASK, MODALITY)  # the model is found (not loaded)
    return prepare_measure(args, None)


def _midline_run(args, inputs, model, progress) -> dict:
    with prepare_measure(args, progress) as outputs:
        result = finish_measure(args, outputs, inputs, model, progress)
    report = result.to_dict()
    # flag and side are the answer of a measurement: kept beside the numbers (the summary's mean
    # of flag is the fraction of cases flagged)
    return {**numbers(report), "flag": result.flag, "side": result.side, "hu_offset_removed": result.hu_offset_removed,
            "seconds_total": sum(result.seconds.values())}  # fmt: skip


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
        read=read_pair_inputs,
        load=load_affine_model,
        model_options=("model", "modality"),
        summary_metrics=("dice_before", "dice_after", "seconds"),
    ),
    "deformable": TaskSteps(
        default_outputs={"output-transform": "field.nii.gz", "output-json": "deformable.json"},
        check=_deformable_check,
        run=_deformable_run,
        read=read_pair_inputs,
        load=load_deformable_model,
        model_options=("model", "method", "modality"),
        summary_metrics=("dice_before", "dice_after", "folding_percent", "ndv_percent", "ice_mean_mm", "seconds_total"),
    ),
    "midline": TaskSteps(
        default_outputs={"output-json": "midline.json"},
        check=_midline_check,
        run=_midline_run,
        read=read_measure_input,
        load=load_measure_model,
        model_options=("model",),
        summary_metrics=("case_mls_mm", "flag", "seconds_total"),
        columns=("input", "model", *(flag.lstrip("-") for flag in MIDLINE_OUTPUT_FLAGS)),
    ),
    "evaluate": TaskSteps(
        default_outputs={"output-json": "evaluation.json"},
        check=_evaluate_check,
        run=_evaluate_run,
        summary_metrics=("mean_dice", "mean_hd95", "tre.mean_mm", "deformation.folding_fraction", "deformation.ndv_percent"),
    ),
}
