"""The ``diffusionreg`` command line.

Every command shares ``--device``, ``--progress`` and ``--quiet``. Exit codes: 0 success,
2 bad input (one line on stderr naming the problem, no output left behind), 130 cancelled,
1 any other failure (set DIFFUSIONREG_TRACEBACK=1 to see the traceback). Capability packages
add their own commands through ``add_commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from diffusionreg import __version__
from diffusionreg.devices import check_device_name
from diffusionreg.errors import CancelledError, InputError
from diffusionreg.progress import Progress, install_cancel_handler
from diffusionreg.vocabulary import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK

# Modules that contribute commands: each has add_commands(commands, train_commands, common).
_COMMAND_MODULES = ("diffusionreg.affine.commands", "diffusionreg.deformable.commands")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors in our one-line form with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _device_type(text: str) -> str:
    try:
        return check_device_name(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def common_options() -> argparse.ArgumentParser:
    """Options shared by every command (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options")
    group.add_argument("--device", default="auto", type=_device_type, help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    group.add_argument(
        "--progress",
        default="tqdm",
        choices=("tqdm", "json", "none"),
        help="tqdm bars on the terminal (default), json lines {stage, fraction, message} for Slicer, or none",
    )
    group.add_argument("--quiet", action="store_true", help="print only errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="diffusionreg",
        description="Diffusion-model registration with exact world geometry (transforms in ITK's LPS resampling convention).",
    )
    parser.add_argument("--version", action="version", version=f"diffusionreg {__version__}")
    common = common_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    commands.required = True

    _add_evaluate(commands, common)
    _add_resample(commands, common)
    train = commands.add_parser("train", help="train a model (affine, deformable)", parents=[common])
    train_commands = train.add_subparsers(dest="train_command", metavar="METHOD", parser_class=_ArgumentParser)
    train_commands.required = True

    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                continue  # capability not installed in this build
            raise
        module.add_commands(commands, train_commands, common)
    return parser


def _add_evaluate(commands, common) -> None:
    p = commands.add_parser(
        "evaluate",
        parents=[common],
        help="Dice/HD95 of moving labels carried onto fixed labels through transforms; TRE; Jacobian",
        description=(
            "Warp the moving labels onto the fixed grid through the transform(s) (nearest neighbour) and compare. "
            "Transforms map fixed points to moving points (ITK convention); given as --transform T1 --transform T2 "
            "they compose as T1(T2(x)): the last one is applied to a fixed point first, as in antsApplyTransforms."
        ),
    )
    p.add_argument("--fixed-labels", required=True, type=Path, help="label map on the fixed grid")
    p.add_argument("--moving-labels", required=True, type=Path, help="label map on the moving grid")
    p.add_argument("--transform", action="append", type=Path, default=[], help="transform file (repeatable; last applied first)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--labels", help="comma-separated labels to score, e.g. 2,3,4 (default: every label in the fixed map)")
    which.add_argument("--labels-file", type=Path, help="file listing labels to score (commas or whitespace)")
    p.add_argument("--landmarks", type=Path, help="CSV of paired landmarks (fixed_x..moving_z in LPS mm, or fixed_i..moving_k voxels)")
    p.add_argument("--mask", type=Path, help="region for the Jacobian statistics, on the grid of the displacement field")
    p.add_argument("--output-json", type=Path, help="write the results as JSON")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace, progress: Progress) -> int:
    from diffusionreg.evaluation import Landmarks, evaluate, format_table, parse_label_list, read_label_file, read_landmarks
    from diffusionreg.image import read_image
    from diffusionreg.io_atomic import atomic_output
    from diffusionreg.transforms import read_transforms

    _check_output_suffix(args.output_json, (".json",), "--output-json")
    with progress.stage("read", total=3) as stage:
        fixed = read_image(args.fixed_labels, what="fixed labels")
        stage.update(message="fixed labels")
        moving = read_image(args.moving_labels, what="moving labels")
        stage.update(message="moving labels")
        transform = read_transforms(args.transform) if args.transform else None
        mask = read_image(args.mask, what="mask") if args.mask else None
        stage.update(message="transforms")
    labels = parse_label_list(args.labels) if args.labels else read_label_file(args.labels_file) if args.labels_file else None
    landmarks: Landmarks | None = read_landmarks(args.landmarks, fixed.grid, moving.grid) if args.landmarks else None
    with progress.stage("evaluate", total=1) as stage:
        result = evaluate(fixed, moving, transform, labels, landmarks, mask)
        stage.update()
    progress.log(format_table(result))
    if args.output_json:
        with atomic_output(args.output_json) as temporary:
            temporary.write_text(json.dumps(result, indent=2))
    return EXIT_OK


def _add_resample(commands, common) -> None:
    p = commands.add_parser(
        "resample",
        parents=[common],
        help="resample an image onto a reference grid through transform(s)",
        description="Output voxel x takes input(T1(T2(...Tn(x)))): transforms map reference points to input points (ITK convention).",
    )
    p.add_argument("--input", required=True, type=Path, help="image to resample (the moving image)")
    p.add_argument("--reference", required=True, type=Path, help="image whose grid the output takes (the fixed image)")
    p.add_argument("--transform", action="append", type=Path, default=[], help="transform file (repeatable; last applied first)")
    p.add_argument("--output", required=True, type=Path, help="output image (.nii.gz, .nrrd, .mha)")
    p.add_argument("--interpolation", default="linear", choices=("linear", "nearest", "bspline"))
    p.add_argument("--default-value", type=float, default=0.0, help="value outside the input image")
    p.set_defaults(handler=_run_resample)


def _run_resample(args: argparse.Namespace, progress: Progress) -> int:
    from diffusionreg.image import IMAGE_SUFFIXES, read_image, resample, write_image
    from diffusionreg.transforms import read_transforms

    _check_output_suffix(args.output, IMAGE_SUFFIXES, "--output")
    with progress.stage("read", total=3) as stage:
        image = read_image(args.input, what="input image", allow_nan=False)
        stage.update()
        reference = read_image(args.reference, what="reference image", allow_nan=True)
        stage.update()
        transform = read_transforms(args.transform) if args.transform else None
        stage.update()
    with progress.stage("resample", total=1) as stage:
        output = resample(image, reference.grid, transform, args.interpolation, default=args.default_value)
        stage.update()
    write_image(output, args.output)
    progress.log(f"wrote {args.output}")
    return EXIT_OK


def _check_output_suffix(path: Path | None, suffixes: Sequence[str], flag: str) -> None:
    """Fail before any work when an output name has an extension we cannot write."""
    if path is None:
        return
    if not any(str(path).lower().endswith(s) for s in suffixes):
        raise InputError(f"{flag} {path}: unsupported extension; use one of {', '.join(suffixes)}")
    if path.parent and not path.parent.exists():
        raise InputError(f"{flag} {path}: folder {path.parent} does not exist")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(args.progress, quiet=args.quiet)
    handler: Callable[[argparse.Namespace, Progress], int] = args.handler
    install_cancel_handler()
    try:
        return int(handler(args, progress) or EXIT_OK)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, CancelledError):
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - last resort: one line, non-zero exit
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        if os.environ.get("DIFFUSIONREG_TRACEBACK"):  # developers: the full traceback
            raise
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
