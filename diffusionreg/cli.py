"""The ``diffusionreg`` command line.

Every command shares ``--device``, ``--progress``, ``--quiet`` and ``--overwrite``. Exit codes:
0 success; 2 bad input (one line on stderr naming the problem); 130 cancelled (Ctrl-C, SIGTERM);
1 any other failure, reported as an internal error (set DIFFUSIONREG_TRACEBACK=1 for the
traceback). Whatever the exit code other than 0, the output locations are left as they were:
every command declares its outputs in a :class:`~diffusionreg.outputs.OutputSet`, which checks
them before any work and commits them all together at the end. Capability packages add their
own commands through ``add_commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from diffusionreg import __version__
from diffusionreg.cancellation import install_cancel_handler
from diffusionreg.devices import check_device_name
from diffusionreg.errors import CancelledError, InputError, ParameterError
from diffusionreg.outputs import OutputSet
from diffusionreg.progress import Progress
from diffusionreg.vocabulary import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_FAILURE,
    EXIT_OK,
)

# Modules that contribute commands: each has add_commands(commands, train_commands, common).
_COMMAND_MODULES = (
    "diffusionreg.affine.commands",
    "diffusionreg.deformable.commands",
    "diffusionreg.model_commands",
    "diffusionreg.batch.command",
    "diffusionreg.midline.commands",
    "diffusionreg.synth.commands",
)


def _input_rules() -> str:
    from diffusionreg.image_files import MAX_VOXEL_VALUES

    return (
        f"Inputs: 3D images of at most {MAX_VOXEL_VALUES:,} voxel values (1024^3; larger ones are refused "
        "before reading), no NaN or infinite voxels, data as long as the header says. Outputs: all written "
        "or none; an output may not be an input or another output of the same command."
    )


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors in our one-line form with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # One usage line (argparse's own usage wraps over many lines for long commands).
        print(f"usage: {self.prog} [options] (see {self.prog} --help)", file=sys.stderr)
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
    group.add_argument(
        "--device", default="auto", type=_device_type, help="auto (default: CUDA when available), cpu, cuda or cuda:N"
    )
    group.add_argument(
        "--progress",
        default="tqdm",
        choices=("tqdm", "json", "none"),
        help="tqdm bars on the terminal (default), json lines {stage, fraction, message} for Slicer, or none",
    )
    group.add_argument("--quiet", action="store_true", help="print only errors")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files even when read-only (an output that is also an input is always refused)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="diffusionreg",
        description="Diffusion-model registration with exact world geometry (transforms in ITK's LPS resampling convention).",
        epilog=_input_rules(),
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
    p.add_argument(
        "--landmarks", type=Path, help="CSV of paired landmarks (fixed_x..moving_z in LPS mm, or fixed_i..moving_k voxels)"
    )
    p.add_argument("--mask", type=Path, help="region for the Jacobian statistics, on the grid of the displacement field")
    p.add_argument("--output-json", type=Path, help="write the results as JSON")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace, progress: Progress) -> int:
    from diffusionreg.evaluation import (
        Landmarks,
        evaluate,
        format_table,
        parse_label_list,
        read_label_file,
        read_landmarks,
    )
    from diffusionreg.image import read_image
    from diffusionreg.transforms import read_transforms

    outputs = OutputSet.from_args(
        args, ("--fixed-labels", "--moving-labels", "--transform", "--labels-file", "--landmarks", "--mask"), progress
    )
    outputs.add("--output-json", args.output_json, (".json",))
    labels = (
        parse_label_list(args.labels)
        if args.labels is not None
        else read_label_file(args.labels_file)
        if args.labels_file
        else None
    )
    with outputs:
        with progress.stage("read", total=3) as stage:
            fixed = read_image(args.fixed_labels, what="fixed labels")
            stage.update(message="fixed labels")
            moving = read_image(args.moving_labels, what="moving labels")
            stage.update(message="moving labels")
            transform = read_transforms(args.transform) if args.transform else None
            mask = read_image(args.mask, what="mask") if args.mask else None
            stage.update(message="transforms")
        landmarks: Landmarks | None = read_landmarks(args.landmarks, fixed.grid, moving.grid) if args.landmarks else None
        with progress.stage("evaluate", total=1) as stage:
            result = evaluate(fixed, moving, transform, labels, landmarks, mask)
            stage.update()
        if outputs.wants("--output-json"):
            outputs.temporary("--output-json").write_text(json.dumps(result, indent=2))
        outputs.commit()
    warn_absent_labels(result)
    progress.log(format_table(result))
    return EXIT_OK


def warn_absent_labels(result: dict) -> None:
    """One warning line on stderr for requested labels that neither label map contains."""
    if result.get("absent_labels"):
        absent = ", ".join(str(v) for v in result["absent_labels"])
        print(f"warning: labels {absent} are in neither label volume; their Dice and HD95 are n/a", file=sys.stderr)


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
    from diffusionreg.image import (
        OUTPUT_IMAGE_SUFFIXES,
        read_image,
        resample,
        write_image,
    )
    from diffusionreg.transforms import read_transforms

    outputs = OutputSet.from_args(args, ("--input", "--reference", "--transform"), progress)
    outputs.add("--output", args.output, OUTPUT_IMAGE_SUFFIXES)
    with outputs:
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
        write_image(output, outputs.temporary("--output"))
        outputs.commit()
    progress.log(f"wrote {args.output}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(args.progress, quiet=args.quiet)
    handler: Callable[[argparse.Namespace, Progress], int] = args.handler
    install_cancel_handler()
    try:
        return int(handler(args, progress) or EXIT_OK)
    except ParameterError as error:
        flags = getattr(args, "parameter_flags", {})
        flag = flags.get(error.parameter, "--" + error.parameter.replace("_", "-"))
        print(f"error: {flag} {error.problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, CancelledError):
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except MemoryError:
        print("error: out of memory; use a smaller image or a machine with more memory", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:  # the machine, not the input or the code: disk full, permissions changed
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        if os.environ.get("DIFFUSIONREG_TRACEBACK"):
            raise
        return EXIT_FAILURE
    except Exception as error:  # a bug: one line, exit 1, and a way to see more
        reason = (str(error).strip().splitlines() or [""])[0]
        print(
            f"error: internal error ({type(error).__name__}: {reason}); this is a bug in diffusionreg, please "
            "report it with the command line (DIFFUSIONREG_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        if os.environ.get("DIFFUSIONREG_TRACEBACK"):  # developers: the full traceback
            raise
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
