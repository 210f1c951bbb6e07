"""What a registration command shows when asked: Dice of label maps, an overlay PNG, timing.

Shared by the registration commands through three calls: :func:`add_report_options` on the
parser, :func:`read_report_labels` with the other inputs (so a bad label file or a label list
that neither map contains fails before any work), and :func:`report` once the transform is known.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress

# evaluation, image and overlay are imported inside the functions: building the command-line
# parser should not pull in numpy-heavy modules (``diffusionreg --help`` stays instant).

#: Input flags of the report options, for the command's output set (an output may not be one).
REPORT_INPUT_FLAGS = ("--fixed-labels", "--moving-labels")


def add_report_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checking the result")
    group.add_argument("--fixed-labels", type=Path, help="label map on the fixed grid: report Dice after registration")
    group.add_argument("--moving-labels", type=Path, help="label map on the moving grid (with --fixed-labels)")
    group.add_argument("--labels", help="comma-separated labels to score (default: every label in the fixed map)")
    group.add_argument("--output-overlay", type=Path, help="PNG of fixed (magenta) and moving (green), before and after")


def add_report_outputs(args: argparse.Namespace, outputs) -> None:
    """Declare the overlay in the command's :class:`~diffusionreg.outputs.OutputSet`."""
    outputs.add("--output-overlay", args.output_overlay, (".png",))


def check_report_options(args: argparse.Namespace) -> None:
    """Fail before any work when the report options are inconsistent."""
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise InputError("--fixed-labels and --moving-labels go together")
    if args.labels is not None:
        from diffusionreg.evaluation import parse_label_list

        parse_label_list(args.labels)


@dataclass
class ReportLabels:
    """The label maps to score and the labels asked for (None: every label of the fixed map)."""

    fixed: object  # diffusionreg.image.Image
    moving: object
    labels: list[int] | None


def read_report_labels(args: argparse.Namespace) -> ReportLabels | None:
    """Read ``--fixed-labels``/``--moving-labels`` and check ``--labels`` against them (InputError)."""
    if args.fixed_labels is None:
        return None
    from diffusionreg.evaluation import labels_in_neither, parse_label_list
    from diffusionreg.image import read_image

    fixed_labels = read_image(args.fixed_labels, what="fixed labels")
    moving_labels = read_image(args.moving_labels, what="moving labels")
    labels = parse_label_list(args.labels) if args.labels is not None else None
    if labels is not None:
        labels_in_neither(fixed_labels, moving_labels, labels)
    return ReportLabels(fixed_labels, moving_labels, labels)


def report(
    labels: ReportLabels | None, overlay_path: Path | None, fixed, moving, transform, progress: Progress, initial_transform=None
) -> dict:
    """Dice before/after (with labels) and the overlay PNG at ``overlay_path``; returns the numbers.

    ``fixed`` and ``moving`` are :class:`~diffusionreg.image.Image`; ``transform`` maps fixed to
    moving points (ITK convention); ``initial_transform`` (default identity) is "before".
    ``overlay_path`` is where to write the picture now (the output set's temporary name).
    """
    from diffusionreg.evaluation import evaluate
    from diffusionreg.image import resample
    from diffusionreg.overlay import write_overlay

    numbers: dict = {}
    if labels is not None:
        before = evaluate(labels.fixed, labels.moving, initial_transform, labels.labels)
        after = evaluate(labels.fixed, labels.moving, transform, labels.labels)
        numbers = {
            "dice_before": before["mean_dice"],
            "dice_after": after["mean_dice"],
            "dice": after["dice"],
            "absent_labels": after["absent_labels"],
        }
        per_label = ", ".join(f"{k}: {_number(v)}" for k, v in after["dice"].items())
        progress.log(
            f"Dice (mean over {len(after['labels'])} labels): {_number(before['mean_dice'])} before, "
            f"{_number(after['mean_dice'])} after  [{per_label}]"
        )
    if overlay_path is not None:
        before_image = resample(moving, fixed.grid, initial_transform)
        after_image = resample(moving, fixed.grid, transform)
        write_overlay(overlay_path, fixed, [before_image, after_image])
    return numbers


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
