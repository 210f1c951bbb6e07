"""CLI: ``diffusionreg affine`` and ``diffusionreg train affine``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusionreg.errors import InputError
from diffusionreg.pair_inputs import PairInputs, read_pair_inputs
from diffusionreg.reporting import add_report_options, check_report_options
from diffusionreg.training.options import RunOptions, add_run_arguments, with_overrides
from diffusionreg.vocabulary import EXIT_OK, INITIALIZATIONS, MODALITIES


def add_commands(commands, train_commands, common) -> None:
    """Register the affine registration command and its training command."""
    p = commands.add_parser(
        "affine",
        parents=[common],
        help="spatial-diffusion affine registration (writes an ITK transform)",
        description=(
            "Affine registration of MOVING onto FIXED with the spatial-diffusion "
            "network. The output transform maps fixed LPS points to moving LPS points "
            "(ITK resampling convention): SimpleITK, 'diffusionreg resample' and Slicer "
            "put the moving image onto the fixed one with it."
        ),
    )
    p.add_argument("--fixed", required=True, type=Path, help="fixed (reference) image")
    p.add_argument("--moving", required=True, type=Path, help="moving image")
    p.add_argument("--output-transform", required=True, type=Path, help="output transform (.h5, .tfm or .txt)")
    p.add_argument("--output-volume", type=Path, help="moving image resampled onto the fixed grid (.nrrd, .nii.gz, .mha)")
    p.add_argument(
        "--model",
        default=None,
        help="model name from Resources/Models.json or a path to a .safetensors "
        "file / model folder (default: the model registered for the modality)",
    )
    p.add_argument(
        "--modality",
        default="mri",
        choices=MODALITIES,
        help="image type: picks the default model, preprocessing and class (default mri)",
    )
    # Registration defaults (None) come from the model's config.json ("inference"), so the
    # command, the Python API and the Slicer panel give the same result with no options.
    p.add_argument(
        "--steps", type=int, default=None, help="reverse-process steps (default: from the model config; all T when unset there)"
    )
    p.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refine with a second pass in the other direction, twice the time (default: from the model config)",
    )
    p.add_argument(
        "--initialize",
        default=None,
        choices=INITIALIZATIONS,
        help="pre-alignment of the network grids: intensity centroids (moments), "
        "image centres, or none (default: from the model config)",
    )
    p.add_argument("--output-json", type=Path, help="write the matrix and timings as JSON")
    p.add_argument(
        "--refine-iterations",
        type=int,
        default=None,
        help=(
            "Adam steps per level of the test-time mutual-information refinement after the "
            "diffusion; 0 runs the published method alone (default: from the model config)"
        ),
    )
    p.add_argument(
        "--pose-search",
        choices=("on", "off"),
        default=None,
        help=(
            "any-pose start: score rotations covering all orientations at low resolution and run the "
            "diffusion from the best; off with --refine-iterations 0 is the published method "
            "(default: from the model config)"
        ),
    )
    add_report_options(p)
    p.set_defaults(handler=_run_affine)

    t = train_commands.add_parser(
        "affine",
        parents=[common],
        help="train a spatial-diffusion affine model",
        description="Self-supervised training; run under torchrun for DDP (gloo on CPU).",
    )
    t.add_argument(
        "--data",
        action="append",
        nargs="+",
        help="training volumes or folders of one modality; repeat it with a --modality each to train one "
        "conditional model over several datasets (class 0 = any, by class dropout)",
    )
    t.add_argument(
        "--val",
        action="append",
        nargs="+",
        help="held-back validation volumes (excluded from training); with several --data, one --val each",
    )
    t.add_argument(
        "--modality",
        action="append",
        choices=MODALITIES[:-1],
        help="modality of each --data, in the same order (default mri)",
    )
    t.add_argument(
        "--manifest",
        type=Path,
        help='JSON file listing the datasets instead of --data/--modality/--val: {"datasets": [{"data": [...], '
        '"modality": "ct", "val": [...]}, ...]}; relative paths are relative to the file',
    )
    t.add_argument("--config", default="compact", help="compact | full | oct | path to config JSON")
    t.add_argument("--batch-size", type=int, default=None, help="override the config batch size")
    add_run_arguments(t, val_every=1000)
    t.add_argument("--seed", type=int, default=None, help="override the config seed")
    t.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace, progress) -> int:
    from .config import get_config
    from .training import TrainOptions, read_manifest, train

    if args.manifest is not None:
        if args.data or args.val or args.modality:
            raise InputError("--manifest lists the datasets: leave out --data, --modality and --val")
        datasets = read_manifest(args.manifest)
    else:
        datasets = training_sets(args.data, args.modality, args.val)
    cfg = with_overrides(get_config(args.config), batch_size=args.batch_size, seed=args.seed)
    train(TrainOptions(datasets=datasets, config=cfg), RunOptions.from_args(args), progress)
    return EXIT_OK


def training_sets(data, modalities, val) -> list:
    """The k-th ``--data`` group with the k-th ``--modality`` (one --modality, or none = mri, for
    a single group) and the k-th ``--val`` group."""
    from .training import TrainingSet

    if not data:
        raise InputError("give the training volumes: --data (one per modality) or --manifest")
    modalities = modalities or ["mri"]
    if len(modalities) != len(data):
        raise InputError(f"{len(data)} --data groups but {len(modalities)} --modality: give one --modality per --data")
    if val and len(val) != len(data):
        raise InputError(f"{len(data)} --data groups but {len(val)} --val: give one --val per --data, or none")
    return [
        TrainingSet(list(group), modality, list(val[k]) if val else None)
        for k, (group, modality) in enumerate(zip(data, modalities))
    ]


def _run_affine(args: argparse.Namespace, progress) -> int:
    from diffusionreg.devices import resolve_device

    outputs = prepare_affine(args, progress)
    with outputs:
        with progress.stage("read", total=4) as stage:
            inputs = read_pair_inputs(args, stage)
            model = load_affine_model(args, resolve_device(args.device))
            stage.update(message="model")
        result, numbers = finish_affine(args, outputs, inputs, model, progress)
    if numbers.get("absent_labels"):
        from diffusionreg.cli import warn_absent_labels

        warn_absent_labels(numbers)
    progress.log(f"wrote {args.output_transform} ({result.seconds:.1f} s, model {model.name})")
    return EXIT_OK


# The command in steps, so that ``diffusionreg batch`` can check a row without running it, read a
# case's inputs ahead on a worker thread and run many cases through one loaded model.


def prepare_affine(args: argparse.Namespace, progress):
    """Declare and check the outputs and options of one run (before any reading); an OutputSet."""
    from diffusionreg.image import OUTPUT_IMAGE_SUFFIXES
    from diffusionreg.outputs import OutputSet
    from diffusionreg.reporting import REPORT_INPUT_FLAGS, add_report_outputs

    outputs = OutputSet.from_args(args, ("--fixed", "--moving", *REPORT_INPUT_FLAGS), progress)
    outputs.add("--output-transform", args.output_transform, (".h5", ".hdf5", ".tfm", ".txt"))
    outputs.add("--output-volume", args.output_volume, OUTPUT_IMAGE_SUFFIXES)
    outputs.add("--output-json", args.output_json, (".json",))
    add_report_outputs(args, outputs)
    if args.steps is not None and args.steps < 1:
        raise InputError("--steps must be >= 1")
    if args.refine_iterations is not None and args.refine_iterations < 0:
        raise InputError("--refine-iterations must be >= 0")
    check_report_options(args)
    return outputs


def load_affine_model(args: argparse.Namespace, device):
    """The model ``--model``/``--modality`` name on ``device`` (sha256 checked), refused for a modality it lacks."""
    from .register import load_model

    model = load_model(args.model, args.modality, device=device)
    check_modality(model, args.modality)
    return model


def finish_affine(args: argparse.Namespace, outputs, inputs: PairInputs, model, progress):
    """Register with a loaded ``model``, write every declared output and commit them.

    Returns the :class:`~.register.AffineResult` and the report numbers (Dice with labels).
    """
    from diffusionreg.image import resample, write_image
    from diffusionreg.reporting import report
    from diffusionreg.transforms import write_transform

    from .register import register_affine

    fixed, moving = inputs.fixed, inputs.moving
    result = register_affine(
        fixed,
        moving,
        model,
        modality=args.modality,
        steps=args.steps,
        bidirectional=args.bidirectional,
        initialize=args.initialize,
        progress=progress,
        refine_iterations=args.refine_iterations,
        pose_search=None if args.pose_search is None else args.pose_search == "on",
    )
    if result.doubtful:  # a warning, not an error: the outputs are still written
        print(f"warning: result doubtful: {result.doubt}", file=sys.stderr)
    write_transform(result.transform, outputs.temporary("--output-transform"))
    if outputs.wants("--output-volume"):
        with progress.stage("resample", total=1) as stage:
            warped = resample(moving, fixed.grid, result.transform, "linear", default=0.0)
            stage.update()
        write_image(warped, outputs.temporary("--output-volume"))
    overlay = outputs.temporary("--output-overlay") if outputs.wants("--output-overlay") else None
    numbers = report(inputs.labels, overlay, fixed, moving, result.transform, progress)
    if outputs.wants("--output-json"):
        outputs.temporary("--output-json").write_text(json.dumps(result.to_dict(), indent=2))
    outputs.commit()
    return result, numbers


def check_modality(model, modality: str) -> None:
    """Refuse a modality the model was not trained for: its classes, and ``any`` only with a
    trained agnostic class (:attr:`AffineConfig.modalities`)."""
    supported = model.cfg.modalities
    if modality not in supported:
        raise InputError(f"--modality {modality}: model {model.name} was trained for {', '.join(supported)} only")
