"""CLI: ``diffusionreg midline`` (measure), ``diffusionreg midline synth`` (make a synthetic case) and
``diffusionreg train midline --stage ...``."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusionreg.training.options import RunOptions, add_run_arguments
from diffusionreg.vocabulary import EXIT_OK

DEFAULT_TEMPLATE_DIR = Path("../shared/data/headct")


def add_commands(commands, train_commands, common) -> None:
    """Register the midline commands and the midline training."""
    p = commands.add_parser(
        "midline",
        parents=[common],
        help="midline shift (mm) of a head CT (diffusion models + deformation network)",
        description=(
            "Measure the midline shift of a head CT (NIfTI, NRRD or a DICOM folder; HU or HU+1024). The head is "
            "aligned to the SCCT template (rigid + isotropic scale), axial slices of the aligned head are read by "
            "the model, and the shift is measured in the CT's own millimetres. 'diffusionreg midline synth' "
            "makes a synthetic case of known shift."
        ),
    )
    p.add_argument("--input", type=Path, help="head CT (file or DICOM folder)")
    p.add_argument("--output-json", type=Path, help="report: case MLS (mm), flag, side, per-slice MLS, slice of the maximum")
    p.add_argument("--output-landmarks", type=Path, help="Slicer markups (.mrk.json): four landmarks per measured slice")
    p.add_argument("--output-field", type=Path, help="ITK displacement field on the CT grid (mm), zero off the measured slices")
    p.add_argument("--output-table", type=Path, help="CSV, one row per measured slice")
    p.add_argument("--model", default=None, help="registered model name (default head-ct-mls) or path to weights/folder")
    p.add_argument("synth", nargs="?", choices=("synth",), help=argparse.SUPPRESS)
    _add_synth_arguments(p)
    p.set_defaults(handler=_run_midline)

    t = train_commands.add_parser(
        "midline",
        parents=[common],
        help="train a midline-shift stage (diffusion-normal, diffusion-all, deformation)",
        description=(
            "Three stages: the two diffusion models, then the deformation network on both (frozen). Training data: "
            "the SCCT template head plus any --normal heads, with synthetic mass effects; --val heads are held out."
        ),
    )
    t.add_argument("--stage", required=True, choices=("diffusion-normal", "diffusion-all", "deformation"))
    t.add_argument("--template-dir", type=Path, default=DEFAULT_TEMPLATE_DIR, help="folder of the SCCT template files")
    t.add_argument("--normal", type=Path, nargs="*", default=[], help="more normal head CTs (files or DICOM folders)")
    t.add_argument("--val", type=Path, nargs="*", default=[], help="held-out normal head CTs (validation)")
    t.add_argument("--config", default="compact", help="preset (compact, full) or a config JSON file")
    t.add_argument("--eps-normal", type=Path, help="eps_normal weights (deformation stage)")
    t.add_argument("--eps-all", type=Path, help="eps_all weights (deformation stage)")
    t.add_argument("--pose-cache", type=Path, help="JSON of the normal heads' poses (read, and extended when missing)")
    add_run_arguments(t, val_every=200)
    t.set_defaults(handler=_run_train)


def _add_synth_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synth (diffusionreg midline synth --normal-head CT --output CT --output-truth JSON)")
    g.add_argument("--normal-head", type=Path, help="normal head CT to shift (default: the SCCT template head)")
    g.add_argument("--template-dir", type=Path, default=DEFAULT_TEMPLATE_DIR, help="folder of the SCCT template files")
    g.add_argument("--output", type=Path, help="synthetic CT (.nii.gz, .nrrd, .mha)")
    g.add_argument("--output-truth", type=Path, help="truth JSON: case MLS (mm), side, landmarks per slice (LPS)")
    g.add_argument("--shift-mm", type=float, default=None, help="peak midline shift (default: random 0-15)")
    g.add_argument("--side", choices=("left", "right"), default=None, help="direction the midline moves (default random)")
    g.add_argument("--lesion", choices=("hyperdense", "hypodense"), default=None, help="lesion type (default random)")
    g.add_argument("--slice-mm", type=float, default=5.0, help="slice thickness of the synthetic CT")
    g.add_argument("--pixel-mm", type=float, default=0.9, help="in-plane spacing")
    g.add_argument("--rotation-deg", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("PITCH", "ROLL", "YAW"))
    g.add_argument("--noise-hu", type=float, default=3.0)
    g.add_argument("--hu-offset", type=float, default=0.0, help="1024: write HU + 1024 (unsigned style)")
    g.add_argument("--seed", type=int, default=0)


def _config(text: str):
    import json

    from diffusionreg.errors import InputError

    from .config import PRESETS, MidlineConfig

    if text in PRESETS:
        return PRESETS[text]()
    path = Path(text)
    if not path.exists():
        raise InputError(f"midline config {text!r}: not a preset ({', '.join(PRESETS)}) nor a file")
    return MidlineConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _run_train(args: argparse.Namespace, progress) -> int:
    from .training import MidlineTrainOptions, train

    train(
        MidlineTrainOptions(
            stage=args.stage,
            template_dir=args.template_dir,
            config=_config(args.config),
            normal=list(args.normal),
            val=list(args.val),
            eps_normal=args.eps_normal,
            eps_all=args.eps_all,
            pose_cache=args.pose_cache,
        ),
        RunOptions.from_args(args),
        progress,
    )
    return EXIT_OK


def _run_midline(args: argparse.Namespace, progress) -> int:
    if args.synth:
        from .synth_command import run_synth

        return run_synth(args, progress)
    from .measure_command import run_measure

    return run_measure(args, progress)
