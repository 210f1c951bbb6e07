"""What a registration command shows when asked: Dice of label maps, an overlay PNG, timing.

Shared by the ``affine`` and ``deformable`` commands through two calls:
:func:`add_report_options` on the parser and :func:`report` after the transform is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress

# evaluation, image and overlay are imported inside the functions: building the command-line
# parser should not pull in numpy-heavy modules (``diffusionreg --help`` stays instant).


def add_report_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checking the result")
    group.add_argument("--fixed-labels", type=Path, help="label map on the fixed grid: report Dice after registration")
    group.add_argument("--moving-labels", type=Path, help="label map on the moving grid (with --fixed-labels)")
    group.add_argument("--labels", help="comma-separated labels to score (default: every label in the fixed map)")
    group.add_argument("--output-overlay", type=Path, help="PNG of fixed (magenta) and moving (green), before and after")


def check_report_options(args: argparse.Namespace) -> None:
    """Fail before any work when the report options are inconsistent."""
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise InputError("--fixed-labels and --moving-labels go together")
    if args.output_overlay is not None and not str(args.output_overlay).lower().endswith(".png"):
        raise InputError(f"--output-overlay {args.output_overlay}: the overlay is a .png file")
    if args.labels is not None:
        from diffusionreg.evaluation import parse_label_list

        parse_label_list(args.labels)


def report(args: argparse.Namespace, fixed, moving, transform, progress: Progress, initial_transform=None) -> dict:
    """Dice before/after (with labels) and the overlay (with --output-overlay); returns the numbers.

    ``fixed`` and ``moving`` are :class:`~diffusionreg.image.Image`; ``transform`` maps fixed to
    moving points (ITK convention); ``initial_transform`` (default identity) is "before".
    """
    from diffusionreg.evaluation import evaluate, parse_label_list
    from diffusionreg.image import read_image, resample
    from diffusionreg.overlay import write_overlay

    numbers: dict = {}
    if args.fixed_labels is not None:
        fixed_labels = read_image(args.fixed_labels, what="fixed labels")
        moving_labels = read_image(args.moving_labels, what="moving labels")
        labels = parse_label_list(args.labels) if args.labels else None
        before = evaluate(fixed_labels, moving_labels, initial_transform, labels)
        after = evaluate(fixed_labels, moving_labels, transform, labels)
        numbers = {"dice_before": before["mean_dice"], "dice_after": after["mean_dice"], "dice": after["dice"]}
        per_label = ", ".join(f"{k}: {v:.3f}" for k, v in after["dice"].items() if v is not None)
        progress.log(f"Dice (mean over {len(after['labels'])} labels): {before['mean_dice']:.3f} before, "
                     f"{after['mean_dice']:.3f} after  [{per_label}]")
    if args.output_overlay is not None:
        before_image = resample(moving, fixed.grid, initial_transform)
        after_image = resample(moving, fixed.grid, transform)
        write_overlay(args.output_overlay, fixed, [before_image, after_image])
        progress.log(f"wrote {args.output_overlay} (top: before, bottom: after)")
    return numbers
