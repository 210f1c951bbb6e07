"""CLI: ``diffusionreg synth`` (generate pairs) and ``diffusionreg train synth --stage vqae|prior``."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusionreg.training.options import RunOptions, add_run_arguments
from diffusionreg.vocabulary import EXIT_OK


def add_commands(commands, train_commands, common) -> None:
    """Register the generator command and its training."""
    t = train_commands.add_parser(
        "synth",
        parents=[common],
        help="train the paired-data generator (stage vqae, then stage prior)",
        description=(
            "Two stages (Unleashing Registration): the paired VQ-AE on (fixed, moving) vessel maps, then the "
            "absorbing-diffusion transformer on the token grids of the training pairs (give the VQ-AE run with --vqae)."
        ),
    )
    t.add_argument("--stage", required=True, choices=("vqae", "prior"))
    t.add_argument("--pairs", nargs="+", required=True, help="folders of case_XXX_1/_2 vessel maps, or FIXED,MOVING items")
    t.add_argument("--val-pairs", nargs="*", default=None, help="validation pairs (model choice)")
    t.add_argument("--vqae", type=Path, default=None, help="prior stage: the VQ-AE run folder (best/ is used)")
    t.add_argument("--config", default="compact", help="preset (compact, full) or a config JSON file")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: the config's)")
    t.add_argument("--modality", default="lung-vessels", help="registry modality of the model (default lung-vessels)")
    add_run_arguments(t, val_every=250)
    t.set_defaults(handler=_run_train)

    from .generate_command import add_generate_command

    add_generate_command(commands, common)


def _run_train(args: argparse.Namespace, progress) -> int:
    from diffusionreg.training.options import with_overrides

    from .config import get_config
    from .training import SynthTrainOptions, train

    cfg = get_config(args.config)
    if args.seed is not None:
        cfg = with_overrides(cfg, seed=args.seed)
    train(
        SynthTrainOptions(
            stage=args.stage, pairs=args.pairs, config=cfg, val_pairs=args.val_pairs, vqae=args.vqae, modality=args.modality
        ),
        RunOptions.from_args(args),
        progress,
    )
    return EXIT_OK
