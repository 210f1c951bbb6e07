"""Instance-optimisation variants of the lung-vessels model on one validation pair (issue 18).

Each variant runs the default pipeline's registration stages on the network grid: instance
optimisation (the variant), the network pass, the default velocity refinement (the model
config's), then the landmark TRE (mm) of the refined pair on the refinement grid (the world
output field samples that pair trilinearly, so the benchmark's TRE agrees to ~0.01 mm). Wall
seconds of the IO and refinement stages; run with ``--threads 1`` like bench/deformable.py.

Variant syntax: ``+``-joined options, e.g. ``frozen1+steps15+sq6``: ``frozenK`` the first K ICON
step networks keep their weights (``inference.io_frozen_steps``), ``stepsN`` IO steps (default the
config's), ``sqN`` squarings of the exponentials during IO only (the network pass keeps the
config's), ``lrX`` learning rate, ``tolX`` stop once the loss fell by less than X (relative) per
step over the last 4 steps. ``base`` = the config's IO with every network optimised.

    .venv/bin/python bench/deformable_io.py --case 056 --variants base,frozen1,frozen1+sq6
    .venv/bin/python bench/deformable_io.py --case 056 --variants frozen1+steps0 --refine '{"coarse_sigma": 0}'

``--refine`` replaces settings of the model's refinement config (JSON, ``FieldRefineConfig`` field
names) for every variant; ``steps0`` runs no instance optimisation.

Prints one JSON line per variant (losses included) and appends it to bench/out/deformable_io.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deformable import LUNG, OUT  # the benchmark's data paths


def parse_variant(text: str, cfg) -> dict:
    options = {"frozen": 0, "steps": cfg.inference.io_steps, "squarings": None, "lr": cfg.inference.io_lr, "tol": None}
    for part in text.split("+"):
        for key, cast in (("frozen", int), ("steps", int), ("sq", int), ("lr", float), ("tol", float)):
            if part.startswith(key) and part != "base":
                options["squarings" if key == "sq" else key] = cast(part[len(key) :])
    return options


def run_variant(
    model, variant: str, moving, fixed, fine_moving, fine_fixed, fine_grid, grid, landmarks, refine_changes=None
) -> dict:
    from diffusionreg.deformable.field_refine import refine_pair
    from diffusionreg.deformable.register import pair_loss
    from diffusionreg.deformable.training import landmark_tre

    cfg = model.cfg
    options = parse_variant(variant, cfg)
    t0 = time.perf_counter()
    net = copy.deepcopy(model.net).train()
    if options["squarings"]:
        net.cfg = replace(net.cfg, squarings=options["squarings"])
    frozen = options["frozen"]
    if frozen:
        for module in net.nets[:frozen]:
            module.requires_grad_(False)
        midpoints = net.advance(moving, fixed, frozen)

        def loss_fn():
            return sum(net.step_losses(*midpoints, cfg.similarity, cfg.regularisation_weight, cfg.ncc_window, frozen))

    else:

        def loss_fn():
            return pair_loss(net, cfg, moving, fixed)[0]

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=options["lr"])
    losses: list[float] = []
    for _ in range(options["steps"]):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if options["tol"] and len(losses) >= 5 and (losses[-5] - losses[-1]) / 4 < options["tol"] * losses[-1]:
            break
    seconds_io = time.perf_counter() - t0
    net.cfg = model.net.cfg
    net.eval()
    with torch.no_grad():
        u, w = net(moving, fixed)
    tre_network = float(landmark_tre(u, grid, *landmarks).mean())
    t1 = time.perf_counter()
    refine = replace(cfg.inference.refine, **(refine_changes or {}))
    u, w, _ = refine_pair(u, w, fine_moving, fine_fixed, refine, cfg.similarity, cfg.ncc_window)
    return {
        "variant": variant,
        "io_steps_taken": len(losses),
        "seconds_io": round(seconds_io, 1),
        "seconds_refine": round(time.perf_counter() - t1, 1),
        "tre_network_mm": round(tre_network, 3),
        "tre_mm": round(float(landmark_tre(u, fine_grid, *landmarks).mean()), 3),
        "losses": [round(x, 5) for x in losses],
    }


def main() -> int:
    from diffusionreg.deformable.register import load_model, network_grid, to_network
    from diffusionreg.evaluation import read_landmarks
    from diffusionreg.image import read_image, resized_grid

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="056")
    ap.add_argument("--variants", default="base,frozen1")
    ap.add_argument("--model", default="lung-vessels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--refine", default="{}", help="JSON: refinement settings replaced for every variant")
    args = ap.parse_args()
    refine_changes = json.loads(args.refine)
    torch.set_num_threads(args.threads)
    fixed = read_image(LUNG / f"case_{args.case}_1.nii.gz")
    moving = read_image(LUNG / f"case_{args.case}_2.nii.gz")
    lm = read_landmarks(LUNG / f"case_{args.case}_landmarks_voxel.csv", fixed.grid, moving.grid)
    model = load_model(args.model)
    cfg = model.cfg
    grid = network_grid(fixed, cfg)
    fine = resized_grid(grid, cfg.inference.refine.fine_shape(cfg.grid_shape))
    inputs = (to_network(moving, grid, cfg), to_network(fixed, grid, cfg))
    fine_inputs = (to_network(moving, fine, cfg), to_network(fixed, fine, cfg))
    OUT.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        row = {"case": args.case, "threads": args.threads, "refine": refine_changes}
        row.update(run_variant(model, variant, *inputs, *fine_inputs, fine, grid, (lm.fixed, lm.moving), refine_changes))
        print(json.dumps(row), flush=True)
        with (OUT / "deformable_io.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
