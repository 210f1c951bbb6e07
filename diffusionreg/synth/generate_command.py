"""``diffusionreg synth``: write N synthetic (fixed, moving) vessel-map pairs and their manifest.

``--output DIR`` (an existing folder) receives ``pair_000_fixed.nii.gz``, ``pair_000_moving.nii.gz``,
... and ``manifest.json``. All outputs are declared and checked before any work and written
together at the end (a cancel or an error leaves the folder as it was). Sampling defaults
(steps, temperature) come from the model's config.json. Under ``torchrun`` every rank makes the
indices ``rank, rank + world, ...`` and writes its own pairs; rank 0 writes the manifest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffusionreg.errors import InputError, ParameterError
from diffusionreg.vocabulary import EXIT_OK

from .manifest import MAX_PAIRS


def add_generate_command(commands, common) -> None:
    p = commands.add_parser(
        "synth",
        parents=[common],
        help="generate synthetic paired vessel maps (paired VQ-AE + absorbing-diffusion transformer)",
        description=(
            "Draw new (fixed, moving) lung-vessel map pairs from a trained generator. Writes pair_NNN_fixed/moving.nii.gz "
            "(vessel probability, exact frame geometry) and manifest.json (per-pair novelty against the training pairs "
            "and realism figures) into --output DIR."
        ),
    )
    p.add_argument("--model", default=None, help="registered generator (default lung-vessels-pairs) or a model/run folder")
    p.add_argument("--count", type=int, required=True, help=f"number of pairs (1..{MAX_PAIRS})")
    p.add_argument("--output", type=Path, required=True, help="existing folder that receives the pairs and manifest.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (pair i of seed s is always the same pair)")
    p.add_argument(
        "--first-index",
        type=int,
        default=0,
        help="index of the first pair (default 0): --first-index 4 --count 2 makes pairs 4 and 5, as a longer run would",
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's, 0.9)")
    p.add_argument("--steps", type=int, default=None, help="unmasking steps (default: the model's, 256)")
    p.add_argument(
        "--realism-model",
        default="none",
        help="deformable model that registers each pair for the displacement figure (e.g. lung-vessels; default none)",
    )
    p.set_defaults(handler=run_generate)


def _names(index: int) -> tuple[str, str]:
    return f"pair_{index:03d}_fixed.nii.gz", f"pair_{index:03d}_moving.nii.gz"


def run_generate(args: argparse.Namespace, progress) -> int:
    """Check the options and the outputs, then generate (every rank under torchrun)."""
    from diffusionreg.distributed import end_process_group, rank_and_world, start_process_group

    _check_options(args)
    _, world = rank_and_world()
    owns_group = start_process_group(world)
    try:
        code = _generate(args, progress)
    except BaseException:
        end_process_group(owns_group, wait=False)
        raise
    end_process_group(owns_group)
    return code


def _check_options(args: argparse.Namespace) -> None:
    if not 1 <= args.count <= MAX_PAIRS:
        raise ParameterError("count", f"must be within 1..{MAX_PAIRS}, got {args.count}")
    if not 0 <= args.first_index <= MAX_PAIRS - args.count:
        raise ParameterError(
            "first_index", f"must be within 0..{MAX_PAIRS - args.count} for --count {args.count}, got {args.first_index}"
        )
    if args.temperature is not None and args.temperature <= 0:
        raise ParameterError("temperature", f"must be > 0, got {args.temperature}")
    if args.steps is not None and args.steps < 1:
        raise ParameterError("steps", f"must be >= 1, got {args.steps}")
    if not Path(args.output).is_dir():
        raise InputError(f"--output {args.output}: not an existing folder")


def _generate(args: argparse.Namespace, progress) -> int:
    import torch

    from diffusionreg.distributed import rank_and_world
    from diffusionreg.image import Image, write_image
    from diffusionreg.outputs import OutputSet

    from .generate import NoveltyReference, displacement_figure, iter_indices, load_generator, manifest, realism_figures

    folder = Path(args.output)
    rank, world = rank_and_world()
    indices = list(iter_indices(args.count, rank, world, start=args.first_index))
    outputs = OutputSet([], overwrite=bool(args.overwrite), progress=progress)
    for i in indices:
        fixed_name, moving_name = _names(i)
        outputs.add(f"pair {i} fixed", folder / fixed_name, (".nii.gz",))
        outputs.add(f"pair {i} moving", folder / moving_name, (".nii.gz",))
    if rank == 0:
        outputs.add("--output manifest", folder / "manifest.json", (".json",))

    with outputs:
        with progress.stage("read", total=1) as stage:
            from diffusionreg.devices import resolve_device

            gen = load_generator(args.model, resolve_device(args.device))
            stage.update(message=f"model {gen.name}")
            realism = None
            if args.realism_model and args.realism_model.lower() != "none":
                from diffusionreg.deformable.register import load_model

                realism = load_model(args.realism_model)
        sampling = gen.config.sampling
        steps = sampling.steps if args.steps is None else args.steps
        temperature = sampling.temperature if args.temperature is None else args.temperature
        reference = NoveltyReference(gen)
        records = []
        with progress.stage("generate", total=len(indices) * steps) as stage:
            for n, i in enumerate(indices):
                start = time.perf_counter()
                volumes, tokens = _draw_with_progress(gen, i, args.seed, steps, temperature, stage, n, len(indices))
                seconds = time.perf_counter() - start
                record = {
                    "index": i,
                    "fixed": _names(i)[0],
                    "moving": _names(i)[1],
                    "seconds": round(seconds, 3),
                    "novelty": reference.figures(volumes, tokens),
                    "realism": realism_figures(volumes),
                }
                if realism is not None:
                    record["realism"].update(displacement_figure(volumes, gen.grid, realism))
                for scan, flag in ((0, f"pair {i} fixed"), (1, f"pair {i} moving")):
                    write_image(Image(volumes[scan], gen.grid.affine.copy()), outputs.temporary(flag))
                records.append(record)
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if rank == 0:
            summary = manifest(gen, args.seed, steps, temperature, records)
            outputs.temporary("--output manifest").write_text(_json(summary), encoding="utf-8")
        outputs.commit()
    if rank == 0:
        s = summary["summary"]
        progress.log(
            f"wrote {args.count} pairs to {folder}: {s['seconds_per_pair']:.1f} s per pair, nearest training Dice "
            f"max {s['nearest_dice_max']:.3f} (memorised: {s['memorised']})"
        )
    return EXIT_OK


def _draw_with_progress(gen, index: int, seed: int, steps: int, temperature: float, stage, n: int, total: int):
    """One pair with its sampling steps reported on ``stage`` (a cancel interrupts the sampler)."""
    from .generate import generate_pair

    def on_step(done: int, all_steps: int) -> None:
        stage.update(1, message=f"pair {n + 1}/{total}, step {done}/{all_steps}")

    return generate_pair(gen, index, seed, steps, temperature, on_step=on_step)


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2)
