"""Inverse consistency of the shipped brain SITReg pipeline, measured on the fields as written.

Each pair is registered with the registered ``brain-mri`` deformable model (its default velocity
refinement unless --refine-iterations), the forward field ``D`` (fixed grid) and inverse ``Dinv``
(moving grid) are written with the CLI's writer and read back, then scored:

* ICE forward∘inverse ``|q + Dinv(q) + D(q + Dinv(q)) - q|`` over a 2 mm grid over the moving
  image (as bench/deformable.py) whose image falls inside the fixed grid, over all of those
  points and over the moving foreground (intensity > 5 % of its 99th percentile);
* ICE inverse∘forward, the same with the roles swapped, over a 2 mm grid over the fixed image;
* folding (% det J <= 0) of ``D`` with det J in physical space (finite differences in LPS mm
  through the grid's direction; SimpleITK's filter ignores the direction);
* Dice (13 structures) of the moving labels warped by ``D``, where the pair has labels.

Pairs (../shared/data/brain; none was used to train the model):

* ``benchmark``: vxm_test_scan -> oasis_A after the shared ANTs affine (bench/deformable.py's pair);
* ``mni``: mni152_T1_1mm -> oasis_A with an ANTs affine given as the initial transform (the
  inverse then composes ``T0^-1``; the moving grid differs from the fixed one);
* ``stress``: the benchmark pair with the moving image (and labels) further warped by a smooth
  random diffeomorphism of 20 mm largest displacement (exp of a Gaussian-smoothed velocity).

    .venv/bin/python bench/inverse_consistency.py [--pairs benchmark,mni,stress] [--label NAME]
        [--refine-iterations N] [--threads 1]

Prints one JSON line per pair and a markdown table; writes bench/out/inverse_consistency_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deformable import CACHE, DATA, OUT, SEG13_NAMES, brain_inputs, coarse_grid

STRESS_MAX_MM = 20.0  # largest displacement of the stress deformation
STRESS_SMOOTHING_MM = 12.0  # Gaussian sigma of its velocity
STRESS_GRID_MM = 4.0  # grid of the stress velocity
FOREGROUND_FRACTION = 0.05  # of the 99th intensity percentile
EVAL_SPACING_MM = 2.0  # ICE evaluation grid, as bench/deformable.py


def smooth_deformation(grid, max_mm: float, seed: int):
    """A smooth random diffeomorphism over ``grid``'s box as a displacement field transform (mm)."""
    import torch
    from scipy import ndimage

    from diffusionreg import fields
    from diffusionreg.image import Image
    from diffusionreg.transforms import DisplacementFieldTransform

    coarse = coarse_grid(grid, STRESS_GRID_MM)
    rng = np.random.default_rng(seed)
    sigma = STRESS_SMOOTHING_MM / np.asarray(coarse.spacing)
    velocity = np.stack([ndimage.gaussian_filter(rng.normal(size=coarse.shape), sigma) for _ in range(3)])
    v = torch.from_numpy(velocity)[None]  # voxels of the coarse grid, array axes
    spacing = torch.tensor(coarse.spacing).view(1, 3, 1, 1, 1)
    for _ in range(3):  # rescale until the flow's largest displacement is max_mm
        u = fields.exp_velocity(v, 7)
        v = v * (max_mm / float(torch.linalg.vector_norm(u * spacing, dim=1).max()))
    u = fields.exp_velocity(v, 7)[0].permute(1, 2, 3, 0).numpy()  # voxels, (..., 3)
    world = u @ coarse.affine[:3, :3].T  # voxel displacement -> LPS mm
    return DisplacementFieldTransform(Image(world.astype(np.float64), coarse.affine))


def physical_folding_percent(forward) -> tuple[float, float]:
    """(% det J <= 0, min det J) of a displacement field transform, det J in LPS mm."""
    from diffusionreg.deformable.register import _finite_difference_det

    det = _finite_difference_det(forward.field)
    return float((det <= 0).mean() * 100.0), float(det.min())


def ice(forward, inverse, source_image, target_grid) -> dict:
    """``|q + A(q) + B(q + A(q)) - q|`` (A = ``inverse``, B = ``forward``) over a 2 mm grid over
    ``source_image`` whose image by A lies inside ``target_grid``; all points and foreground."""
    from diffusionreg.image import grid_points, resample
    from diffusionreg.spaces import apply_affine

    grid = coarse_grid(source_image.grid, EVAL_SPACING_MM)
    q = grid_points(grid)
    p = inverse.map_points(q)
    index = apply_affine(np.linalg.inv(target_grid.affine), p)
    inside = np.all((index >= 0) & (index <= np.asarray(target_grid.shape) - 1), axis=1)
    error = np.linalg.norm(forward.map_points(p) - q, axis=1)
    values = resample(source_image, grid, None, "linear").array.reshape(-1)
    foreground = values > FOREGROUND_FRACTION * np.percentile(source_image.array, 99)
    out = {}
    for name, mask in (("all", inside), ("fg", inside & foreground)):
        e = error[mask]
        out.update({f"{name}_mean": float(e.mean()), f"{name}_p95": float(np.percentile(e, 95)), f"{name}_max": float(e.max())})
    return out


def stress_inputs(seed: int = 0):
    from diffusionreg.image import resample

    fixed, fixed_lab, moving, moving_lab = brain_inputs(None)
    deformation = smooth_deformation(fixed.grid, STRESS_MAX_MM, seed)
    return (
        fixed,
        fixed_lab,
        resample(moving, fixed.grid, deformation, "linear"),
        resample(moving_lab, fixed.grid, deformation, "nearest"),
    )


def mni_inputs():
    import ants

    from diffusionreg.image import read_image
    from diffusionreg.transforms import read_transform

    fixed = read_image(DATA / "brain" / "oasis_A_norm.nii.gz", dtype=np.float32)
    moving = read_image(DATA / "brain" / "mni152_T1_1mm.nii.gz", dtype=np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    mat = CACHE / "mni_to_oasisA_affine.mat"
    if not mat.exists():
        import shutil

        from deformable import to_ants

        reg = ants.registration(to_ants(fixed), to_ants(moving), type_of_transform="Affine", verbose=False)
        shutil.copy(reg["fwdtransforms"][0], mat)
    return fixed, None, moving, None, read_transform(mat)


def run_pair(name: str, model, args) -> dict:
    from diffusionreg import metrics
    from diffusionreg.deformable.register import register_deformable
    from diffusionreg.image import resample
    from diffusionreg.transforms import read_transform, write_transform

    initial = None
    if name == "benchmark":
        fixed, fixed_lab, moving, moving_lab = brain_inputs(None)
    elif name == "stress":
        fixed, fixed_lab, moving, moving_lab = stress_inputs()
    elif name == "mni":
        fixed, fixed_lab, moving, moving_lab, initial = mni_inputs()
    else:
        raise SystemExit(f"unknown pair {name!r}")
    t0 = time.perf_counter()
    result = register_deformable(fixed, moving, model, initial, refine_iterations=args.refine_iterations)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # the fields as written by the CLI, read back
        write_transform(result.forward, Path(tmp) / "D.nii.gz")
        write_transform(result.inverse, Path(tmp) / "Dinv.nii.gz")
        forward = read_transform(Path(tmp) / "D.nii.gz")
        inverse = read_transform(Path(tmp) / "Dinv.nii.gz")
    full_forward = forward  # D already contains T0 (and Dinv T0^-1): each alone maps the whole way
    out = {
        "pair": name,
        "seconds": round(seconds, 1),
        "network_grid_ice_mean": result.metrics["ice_mean_mm"],
        "network_grid_ice_p95": result.metrics["ice_p95_mm"],
        **{k: v for k, v in result.metrics.items() if k.startswith("inverse_residual")},
    }
    out.update({f"fwd_inv_{k}": v for k, v in ice(full_forward, inverse, moving, fixed.grid).items()})
    out.update({f"inv_fwd_{k}": v for k, v in ice(inverse, full_forward, fixed, moving.grid).items()})
    out["folding_percent"], out["min_det_j"] = physical_folding_percent(forward)
    if fixed_lab is not None:
        warped = resample(moving_lab, fixed.grid, full_forward, "nearest")
        dice = metrics.dice_per_label(fixed_lab.array, warped.array, sorted(SEG13_NAMES))
        out["dice_mean"] = float(np.nanmean(list(dice.values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="benchmark,mni,stress")
    parser.add_argument("--label", default="current")
    parser.add_argument("--refine-iterations", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from diffusionreg.deformable.register import load_model

    torch.set_num_threads(args.threads)
    model = load_model("brain-mri", modality="mri")
    rows = []
    for name in [p for p in args.pairs.split(",") if p]:
        row = run_pair(name, model, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"inverse_consistency_{args.label}.json").write_text(json.dumps(rows, indent=1))
    print(
        "\n| pair | fwd∘inv mean / p95 / max (mm) | foreground mean / p95 | inv∘fwd mean / p95 / max | "
        "network-grid mean / p95 | folding % | min det J | Dice | s |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        dice = f"{r['dice_mean']:.4f}" if "dice_mean" in r else "n/a"
        print(
            f"| {r['pair']} | {r['fwd_inv_all_mean']:.3f} / {r['fwd_inv_all_p95']:.3f} / {r['fwd_inv_all_max']:.2f} | "
            f"{r['fwd_inv_fg_mean']:.3f} / {r['fwd_inv_fg_p95']:.3f} | "
            f"{r['inv_fwd_all_mean']:.3f} / {r['inv_fwd_all_p95']:.3f} / {r['inv_fwd_all_max']:.2f} | "
            f"{r['network_grid_ice_mean']:.3f} / {r['network_grid_ice_p95']:.3f} | {r['folding_percent']:.4f} | "
            f"{r['min_det_j']:.3f} | {dice} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
