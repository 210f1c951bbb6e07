"""CLI: ``diffusionreg deformable`` and ``diffusionreg train deformable``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusionreg.errors import InputError
from diffusionreg.training.options import RunOptions, add_run_arguments, with_overrides
from diffusionreg.vocabulary import ANY_MODALITY, EXIT_OK, MODALITIES


def add_commands(commands, train_commands, common) -> None:
    """Register the deformable registration command and its training command."""
    p = commands.add_parser(
        "deformable", parents=[common],
        help="inverse-consistent deformable registration (SITReg or two-step ICON)",
        description=("Deformable registration of MOVING onto FIXED. The output is an ITK displacement field on "
                     "the fixed grid mapping fixed LPS points to moving LPS points, the initial transform "
                     "included, so it alone carries the moving image onto the fixed one."))
    p.add_argument("--fixed", required=True, type=Path, help="fixed (reference) image")
    p.add_argument("--moving", required=True, type=Path, help="moving image")
    p.add_argument("--initial-transform", type=Path, help="initial (e.g. affine) transform, fixed -> moving")
    p.add_argument("--output-transform", required=True, type=Path,
                   help="displacement field on the fixed grid (.nii.gz, .nrrd, .mha, or ITK .h5)")
    p.add_argument("--output-inverse-transform", type=Path, help="inverse displacement field on the moving grid")
    p.add_argument("--output-volume", type=Path, help="moving image resampled onto the fixed grid")
    p.add_argument("--output-jacobian", type=Path, help="Jacobian determinant of the output transform (fixed grid)")
    p.add_argument("--model", default=None, help="registered model name or path to weights/folder")
    p.add_argument("--method", choices=("sitreg", "icon"), default=None,
                   help="pick the default model of this method / check the given model's method")
    p.add_argument("--modality", default=None, help="modality used to pick the default model (e.g. mri, lung-vessels)")
    p.add_argument("--instance-optimization", type=int, default=None, metavar="N",
                   help="Adam steps on this pair before predicting (default: the model's, e.g. 50 for ICON)")
    p.add_argument("--refine-iterations", type=int, default=None, metavar="N",
                   help="fine-grid symmetric velocity refinement iterations after the network "
                        "(default: the model's; 0 = off)")
    p.add_argument("--output-json", type=Path, help="write metrics and timings as JSON")
    p.set_defaults(handler=_run_register)

    t = train_commands.add_parser(
        "deformable", parents=[common], help="train a deformable model (SITReg or ICON)",
        description="Unsupervised training; run under torchrun for DDP (gloo on CPU).")
    t.add_argument("--method", choices=("sitreg", "icon"), default="sitreg")
    t.add_argument("--pairs", required=True, nargs="+",
                   help="folders of *_1/*_2 pairs, FIXED,MOVING items, or volumes (all ordered pairs)")
    t.add_argument("--val-pairs", nargs="+", default=None,
                   help="validation pairs (folders with case_XXX_landmarks_voxel.csv give TRE)")
    t.add_argument("--config", default="compact", help="preset name (compact, full, lung-icon, ...) or JSON")
    t.add_argument("--modality", default=ANY_MODALITY, choices=MODALITIES,
                   help="modality of the best model's Models.json entry (default any)")
    add_run_arguments(t, val_every=250)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.set_defaults(handler=_run_train)


def _check_out(flag: str, path: Path | None, suffixes) -> None:
    if path is None:
        return
    if not str(path).lower().endswith(tuple(suffixes)):
        raise InputError(f"{flag} {path}: unsupported extension; use one of {', '.join(suffixes)}")
    if path.parent and not path.parent.exists():
        raise InputError(f"{flag} {path}: folder {path.parent} does not exist")


def _run_train(args: argparse.Namespace, progress) -> int:
    from .config import get_config
    from .training import TrainOptions, train

    cfg = with_overrides(get_config(args.config, args.method), seed=args.seed, lr=args.lr)
    train(TrainOptions(pairs=args.pairs, config=cfg, val_pairs=args.val_pairs, modality=args.modality),
          RunOptions.from_args(args), progress)
    return EXIT_OK


def _run_register(args: argparse.Namespace, progress) -> int:
    from diffusionreg.devices import resolve_device
    from diffusionreg.image import IMAGE_SUFFIXES, read_image, resample, write_image
    from diffusionreg.io_atomic import atomic_output
    from diffusionreg.transforms import read_transform, write_transform

    from .register import load_model, register_deformable

    field_suffixes = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm") + (".h5", ".hdf5")
    _check_out("--output-transform", args.output_transform, field_suffixes)
    _check_out("--output-inverse-transform", args.output_inverse_transform, field_suffixes)
    _check_out("--output-volume", args.output_volume, IMAGE_SUFFIXES)
    _check_out("--output-jacobian", args.output_jacobian, IMAGE_SUFFIXES)
    _check_out("--output-json", args.output_json, (".json",))
    if args.instance_optimization is not None and args.instance_optimization < 0:
        raise InputError("--instance-optimization must be >= 0")
    if args.refine_iterations is not None and args.refine_iterations < 0:
        raise InputError("--refine-iterations must be >= 0")
    with progress.stage("read", total=4) as stage:
        fixed = read_image(args.fixed, what="fixed image")
        stage.update(message="fixed")
        moving = read_image(args.moving, what="moving image")
        stage.update(message="moving")
        for what, image in (("fixed", fixed), ("moving", moving)):
            if image.components != 1:
                raise InputError(f"{what} image must be scalar, it has {image.components} components")
            if min(image.shape) < 2:
                raise InputError(f"{what} image must be 3D with at least 2 voxels per axis, got {image.shape}")
        initial = read_transform(args.initial_transform) if args.initial_transform else None
        stage.update(message="initial transform")
        model = load_model(args.model, device=resolve_device(args.device), method=args.method,
                           modality=args.modality)
        stage.update(message=f"model {model.name}")
    with progress.stage("register", total=1) as stage:
        result = register_deformable(fixed, moving, model, initial, args.instance_optimization,
                                     want_inverse=args.output_inverse_transform is not None,
                                     want_jacobian=args.output_jacobian is not None, progress=progress,
                                     refine_iterations=args.refine_iterations)
        stage.update()
    write_transform(result.forward, args.output_transform)
    if args.output_inverse_transform:
        write_transform(result.inverse, args.output_inverse_transform)
    if args.output_jacobian:
        write_image(result.jacobian, args.output_jacobian)
    if args.output_volume:
        warped = resample(moving, fixed.grid, result.forward, "linear", default=0.0)
        write_image(warped, args.output_volume)
    m = result.metrics
    progress.log(f"deformable ({m['method']}, model {m['model']}, {m['instance_optimization_steps']} IO steps, "
                 f"{m['refine_iterations']} refinement iterations): "
                 f"folding {m['folding_percent']:.4f} %, NDV {m['ndv_percent']:.4f} %, "
                 f"inverse consistency mean {m['ice_mean_mm']:.4f} mm (p95 {m['ice_p95_mm']:.4f}, "
                 f"max {m['ice_max_mm']:.4f}), {m['seconds_total']:.1f} s")
    if args.output_json:
        with atomic_output(args.output_json) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2))
    progress.log(f"wrote {args.output_transform}")
    return EXIT_OK
