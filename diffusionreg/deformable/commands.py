"""CLI: ``diffusionreg deformable`` and ``diffusionreg train deformable``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusionreg.pair_inputs import PairInputs, read_pair_inputs
from diffusionreg.reporting import add_report_options, check_report_options
from diffusionreg.training.options import RunOptions, add_run_arguments, with_overrides
from diffusionreg.vocabulary import ANY_MODALITY, EXIT_OK, MODALITIES

from .quality import QUALITIES


def add_commands(commands, train_commands, common) -> None:
    """Register the deformable registration command and its training command."""
    p = commands.add_parser(
        "deformable",
        parents=[common],
        help="inverse-consistent deformable registration (SITReg or two-step ICON)",
        description=(
            "Deformable registration of MOVING onto FIXED. The output is an ITK displacement field on "
            "the fixed grid mapping fixed LPS points to moving LPS points, the initial transform "
            "included, so it alone carries the moving image onto the fixed one."
        ),
    )
    p.add_argument("--fixed", required=True, type=Path, help="fixed (reference) image")
    p.add_argument("--moving", required=True, type=Path, help="moving image")
    p.add_argument("--initial-transform", type=Path, help="initial (e.g. affine) transform, fixed -> moving")
    p.add_argument(
        "--output-transform",
        required=True,
        type=Path,
        help="displacement field on the fixed grid (.nii.gz, .nrrd, .mha, or ITK .h5)",
    )
    p.add_argument("--output-inverse-transform", type=Path, help="inverse displacement field on the moving grid")
    p.add_argument("--output-volume", type=Path, help="moving image resampled onto the fixed grid")
    p.add_argument("--output-jacobian", type=Path, help="Jacobian determinant of the output transform (fixed grid)")
    p.add_argument("--model", default=None, help="registered model name or path to weights/folder")
    p.add_argument(
        "--method",
        choices=("sitreg", "icon"),
        default=None,
        help="pick the default model of this method / check the given model's method",
    )
    p.add_argument("--modality", default=None, help="modality used to pick the default model (e.g. mri, lung-vessels)")
    p.add_argument(
        "--instance-optimization",
        type=int,
        default=None,
        metavar="N",
        help="Adam steps on this pair before predicting (default: the model's, e.g. 50 for ICON)",
    )
    p.add_argument(
        "--refine-iterations",
        type=int,
        default=None,
        metavar="N",
        help="fine-grid symmetric velocity refinement iterations after the network (default: the model's; 0 = off)",
    )
    p.add_argument(
        "--quality",
        choices=QUALITIES,
        default=None,
        help="speed/accuracy preset of the model config (default: the model's default settings); "
        "--instance-optimization and --refine-iterations override it",
    )
    p.add_argument("--output-json", type=Path, help="write metrics and timings as JSON (with Dice when label maps are given)")
    add_report_options(p)
    # Library parameters named in errors, and the flags that set them.
    p.set_defaults(handler=_run_register, parameter_flags={"io_steps": "--instance-optimization"})

    t = train_commands.add_parser(
        "deformable",
        parents=[common],
        help="train a deformable model (SITReg or ICON)",
        description="Unsupervised training; run under torchrun for DDP (gloo on CPU).",
    )
    t.add_argument("--method", choices=("sitreg", "icon"), default="sitreg")
    t.add_argument(
        "--pairs", required=True, nargs="+", help="folders of *_1/*_2 pairs, FIXED,MOVING items, or volumes (all ordered pairs)"
    )
    t.add_argument(
        "--val-pairs", nargs="+", default=None, help="validation pairs (folders with case_XXX_landmarks_voxel.csv give TRE)"
    )
    t.add_argument(
        "--synthetic-pairs",
        nargs="+",
        default=None,
        help="folders of generated pairs (diffusionreg synth: pair_NNN_fixed/_moving), mixed with --pairs",
    )
    t.add_argument(
        "--synthetic-fraction",
        type=float,
        default=None,
        help="share of training steps drawn from --synthetic-pairs (default: the config's, 0.5)",
    )
    t.add_argument("--config", default="compact", help="preset name (compact, full, lung-icon, ...) or JSON")
    t.add_argument(
        "--modality",
        default=ANY_MODALITY,
        choices=MODALITIES,
        help="modality of the best model's Models.json entry (default any)",
    )
    add_run_arguments(t, val_every=250)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace, progress) -> int:
    from .config import get_config
    from .training import TrainOptions, train

    cfg = with_overrides(
        get_config(args.config, args.method), seed=args.seed, lr=args.lr, synthetic_fraction=args.synthetic_fraction
    )
    train(
        TrainOptions(
            pairs=args.pairs, config=cfg, val_pairs=args.val_pairs, modality=args.modality, synthetic_pairs=args.synthetic_pairs
        ),
        RunOptions.from_args(args),
        progress,
    )
    return EXIT_OK


def _run_register(args: argparse.Namespace, progress) -> int:
    from diffusionreg.devices import resolve_device

    outputs = prepare_deformable(args, progress)
    with outputs:
        with progress.stage("read", total=5) as stage:
            inputs = read_pair_inputs(args, stage)
            model = load_deformable_model(args, resolve_device(args.device))
            stage.update(message=f"model {model.name}")
        result, numbers = finish_deformable(args, outputs, inputs, model, progress)
    if numbers.get("absent_labels"):
        from diffusionreg.cli import warn_absent_labels

        warn_absent_labels(numbers)
    m = result.metrics
    progress.log(
        f"deformable ({m['method']}, model {m['model']}, {m['instance_optimization_steps']} IO steps, "
        f"{m['refine_iterations']} refinement iterations): "
        f"folding {m['folding_percent']:.4f} %, NDV {m['ndv_percent']:.4f} %, "
        f"inverse consistency mean {m['ice_mean_mm']:.4f} mm (p95 {m['ice_p95_mm']:.4f}, "
        f"max {m['ice_max_mm']:.4f}), {m['seconds_total']:.1f} s"
    )
    progress.log(f"wrote {args.output_transform}")
    return EXIT_OK


# The command in steps, so that ``diffusionreg batch`` can check a row without running it, read a
# case's inputs ahead on a worker thread and run many cases through one loaded model.


def prepare_deformable(args: argparse.Namespace, progress):
    """Declare and check the outputs and options of one run (before any reading); an OutputSet."""
    from diffusionreg.image import OUTPUT_IMAGE_SUFFIXES
    from diffusionreg.outputs import OutputSet
    from diffusionreg.reporting import REPORT_INPUT_FLAGS, add_report_outputs

    outputs = OutputSet.from_args(args, ("--fixed", "--moving", "--initial-transform", *REPORT_INPUT_FLAGS), progress)
    field_suffixes = (*OUTPUT_IMAGE_SUFFIXES, ".h5", ".hdf5")
    outputs.add("--output-transform", args.output_transform, field_suffixes)
    outputs.add("--output-inverse-transform", args.output_inverse_transform, field_suffixes)
    outputs.add("--output-volume", args.output_volume, OUTPUT_IMAGE_SUFFIXES)
    outputs.add("--output-jacobian", args.output_jacobian, OUTPUT_IMAGE_SUFFIXES)
    outputs.add("--output-json", args.output_json, (".json",))
    add_report_outputs(args, outputs)
    check_report_options(args)
    return outputs


def load_deformable_model(args: argparse.Namespace, device):
    """The model ``--model``/``--method``/``--modality`` pick, on ``device`` (sha256 checked)."""
    from .register import load_model

    return load_model(args.model, device=device, method=args.method, modality=args.modality)


def finish_deformable(args: argparse.Namespace, outputs, inputs: PairInputs, model, progress):
    """Register with a loaded ``model``, write every declared output and commit them.

    Returns the registration result and the report numbers (Dice with labels).
    """
    from diffusionreg.image import resample, write_image
    from diffusionreg.reporting import report
    from diffusionreg.transforms import write_transform

    from .register import register_deformable

    fixed, moving, initial = inputs.fixed, inputs.moving, inputs.initial
    with progress.stage("register", total=1) as stage:
        result = register_deformable(
            fixed,
            moving,
            model,
            initial,
            args.instance_optimization,
            want_inverse=outputs.wants("--output-inverse-transform"),
            want_jacobian=outputs.wants("--output-jacobian"),
            progress=progress,
            refine_iterations=args.refine_iterations,
            quality=args.quality,
        )
        stage.update()
    write_transform(result.forward, outputs.temporary("--output-transform"))
    if outputs.wants("--output-inverse-transform"):
        write_transform(result.inverse, outputs.temporary("--output-inverse-transform"))
    if outputs.wants("--output-jacobian"):
        write_image(result.jacobian, outputs.temporary("--output-jacobian"))
    if outputs.wants("--output-volume"):
        warped = resample(moving, fixed.grid, result.forward, "linear", default=0.0)
        write_image(warped, outputs.temporary("--output-volume"))
    overlay = outputs.temporary("--output-overlay") if outputs.wants("--output-overlay") else None
    numbers = report(inputs.labels, overlay, fixed, moving, result.forward, progress, initial_transform=initial)
    if outputs.wants("--output-json"):
        outputs.temporary("--output-json").write_text(json.dumps({**result.to_dict(), **numbers}, indent=2))
    outputs.commit()
    return result, numbers
