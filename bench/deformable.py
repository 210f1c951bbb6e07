"""Deformable benchmark: our networks vs ANTs SyN (antspyx) vs elastix B-spline (itk-elastix).

Lung: the 8 CC-BY validation pairs of ../shared/data/lung/vessels_val_cc_by (binarised vessel
maps, fixed = case_XXX_1, moving = case_XXX_2); TRE (mm) at the Lung250M-4B landmarks
(voxel CSVs converted with each grid's affine) through each method's fixed->moving field.
Brain: vxm_test_scan (moving, aseg merged into 13 structures) onto oasis_A (fixed, seg13),
after one shared ANTs affine; Dice and HD95 of the warped labels (nearest neighbour).

Every method is scored the same way from its dense fixed->moving displacement field (LPS mm):
folding (% det J <= 0) and NDV (%, Liu et al.) of that field sampled on a common 2 mm grid
over the fixed image; inverse-consistency error |D(Dinv(q)) + ... - q| (mm) over the moving
grid for the methods that give an inverse (ours by construction, SyN its inverse field;
elastix gives none). Wall time = the registration call (ours: preprocessing, network,
instance optimisation, velocity refinement and full-resolution output fields). Our methods:
``ours`` the network alone, ``ours-io`` + instance optimisation of its weights (the reference's
50 Adam steps), ``ours-refine`` + the fine-grid symmetric velocity refinement
(:mod:`diffusionreg.deformable.field_refine`, the default of the shipped models),
``ours-io-refine`` both. The baselines run on the
binarised maps resampled to --baseline-spacing mm (default 2 mm; their full-resolution runs
do not fit the CPU budget); ours runs on its own network grid. Every method gets --threads.

    .venv/bin/python bench/deformable.py --threads 1 [--methods ours,ours-io,ours-refine,syn,elastix]
        [--lung-cases all|054,055] [--brain] [--reuse] [--device cpu|cuda] [--write-ext .nii] [--forward-only]

``--device`` moves only our methods (the baselines are CPU programs). Our times are end to end as
well (read both images, register, write the fields; CUDA synchronised before every stage timer is
read); on CUDA one short registration per model runs first as a warm-up (the context start)
and is not timed. Without antspyx the baselines cannot run, but ours can, brain included, once
``bench/out/deformable_brain_affine.mat`` exists (antspyx computes it on the first brain run).

Writes bench/out/deformable.md, bench/out/deformable.json and bench/out/deformable.png; each
(case, method) result is cached in bench/out/deformable_cache/ and --reuse keeps the cached
results of the cases/methods not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
CACHE = OUT / "deformable_cache"
REPORT = "deformable"  # bench/out/<REPORT>.md / .json / .png
DATA = Path(os.environ.get("DIFFUSIONREG_SHARED_DATA", ROOT.parent / "shared" / "data"))
LUNG = DATA / "lung" / "vessels_val_cc_by"
LUNG_CASES = ("054", "055", "056", "094", "097", "114", "115", "116")

ASEG13 = {
    1: [10, 49],
    2: [8, 47],
    3: [4, 43],
    4: [7, 46],
    5: [12, 51],
    6: [11, 50],
    7: [13, 52],
    8: [17, 53],
    9: [18, 54],
    10: [3, 42],
    11: [14],
    12: [15],
    13: [16],
}
SEG13_NAMES = {
    1: "thalamus",
    2: "cerebellum cortex",
    3: "lateral ventricle",
    4: "cerebellum WM",
    5: "putamen",
    6: "caudate",
    7: "pallidum",
    8: "hippocampus",
    9: "amygdala",
    10: "cerebral cortex",
    11: "3rd ventricle",
    12: "4th ventricle",
    13: "brainstem",
}


# ----------------------------------------------------------------------------- geometry helpers
def coarse_grid(grid, spacing_mm: float):
    """A grid over the same field of view with (about) ``spacing_mm`` voxels, same axes."""
    from diffusionreg.image import Grid

    factors = np.maximum(1.0, spacing_mm / grid.spacing)
    shape = tuple(int(max(2, np.floor(n / f))) for n, f in zip(grid.shape, factors))
    scale = np.asarray(grid.shape, float) / np.asarray(shape, float)
    affine = grid.affine.copy()
    affine[:3, :3] = grid.affine[:3, :3] * scale
    # outer voxel faces kept: new voxel 0 centre at old index (scale - 1) / 2
    affine[:3, 3] = grid.affine[:3, :3] @ ((scale - 1.0) / 2.0) + grid.affine[:3, 3]
    return Grid(shape, affine)


def field_on_grid(transform, grid) -> np.ndarray:
    """Displacement (mm) of a fixed->moving transform at ``grid``'s voxels, ``(*shape, 3)``."""
    from diffusionreg.image import grid_points

    p = grid_points(grid)
    return (transform.map_points(p) - p).reshape(grid.shape + (3,))


def regularity(transform, grid) -> dict:
    """Folding and NDV of a transform's field sampled on ``grid`` (voxel units of that grid)."""
    import torch

    from diffusionreg import fields

    d = field_on_grid(transform, grid)
    u = d @ np.linalg.inv(grid.affine[:3, :3]).T
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0)))[None].double()
    det = fields.jacobian_determinant(t)
    ndv = fields.non_diffeomorphic_volume(t)
    return {
        "folding_percent": float((det <= 0).double().mean()) * 100,
        "ndv_percent": float(ndv.fraction[0]) * 100,
        "min_jacobian": float(det.min()),
    }


def inverse_consistency(forward, inverse, moving_grid, fixed_grid) -> dict:
    """|D(q + Dinv(q)) + Dinv(q)| over moving-grid points whose image lies inside the fixed grid."""
    from diffusionreg.image import grid_points
    from diffusionreg.spaces import apply_affine

    q = grid_points(moving_grid)
    p = inverse.map_points(q)
    idx = apply_affine(np.linalg.inv(fixed_grid.affine), p)
    inside = np.all((idx >= 0) & (idx <= np.asarray(fixed_grid.shape) - 1), axis=1)
    err = np.linalg.norm(forward.map_points(p[inside]) - q[inside], axis=1)
    return {"ice_mean_mm": float(err.mean()), "ice_p95_mm": float(np.percentile(err, 95)), "ice_max_mm": float(err.max())}


def tre(forward, fixed_mm, moving_mm) -> dict:
    d = np.linalg.norm(forward.map_points(fixed_mm) - moving_mm, axis=1)
    return {
        "tre_mean_mm": float(d.mean()),
        "tre_median_mm": float(np.median(d)),
        "tre_q25_mm": float(np.percentile(d, 25)),
        "tre_q75_mm": float(np.percentile(d, 75)),
        "tre_values": d.round(3).tolist(),
    }


# ----------------------------------------------------------------------------- baselines
def to_ants(image):
    import ants

    return ants.from_numpy(
        np.ascontiguousarray(image.array.astype(np.float32)),
        origin=tuple(image.affine[:3, 3]),
        spacing=tuple(image.spacing),
        direction=image.grid.direction,
    )


def run_syn(fixed, moving, threads: int, heavy: bool = True):
    """ANTs SyN (rigid + affine + SyN): forward and inverse fields. ``heavy``: mean squares and
    100/70/40 iterations for the deformable stage (the configuration of the first benchmarks);
    else antspyx's defaults (``type_of_transform="SyN"``: Mattes MI, 40/20/0)."""
    import ants

    from diffusionreg.transforms import read_transform

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    fi, mi = to_ants(fixed), to_ants(moving)
    options = {"syn_metric": "meansquares", "reg_iterations": (100, 70, 40)} if heavy else {}
    t0 = time.perf_counter()
    reg = ants.registration(fi, mi, type_of_transform="SyN", verbose=False, **options)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        fwd = ants.apply_transforms(fi, mi, reg["fwdtransforms"], compose=os.path.join(tmp, "fwd"))
        inv = ants.apply_transforms(mi, fi, reg["invtransforms"], whichtoinvert=[True, False], compose=os.path.join(tmp, "inv"))
        return read_transform(fwd), read_transform(inv), seconds


def run_baseline(method: str, fixed, moving, threads: int):
    if method == "elastix":
        return run_elastix(fixed, moving, threads)
    return run_syn(fixed, moving, threads, heavy=method == "syn")


def run_elastix(fixed, moving, threads: int):
    """elastix affine then B-spline (default maps, 8 mm final grid; Mattes MI): forward field only."""
    import itk

    from diffusionreg.image import Image
    from diffusionreg.transforms import DisplacementFieldTransform

    def to_itk(image):
        im = itk.image_from_array(np.ascontiguousarray(image.array.astype(np.float32).transpose(2, 1, 0)))
        im.SetOrigin(image.affine[:3, 3].tolist())
        im.SetSpacing(image.spacing.tolist())
        im.SetDirection(itk.matrix_from_array(np.ascontiguousarray(image.grid.direction)))
        return im

    fi, mi = to_itk(fixed), to_itk(moving)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine", 3))
    po.AddParameterMap(po.GetDefaultParameterMap("bspline", 3, 8.0))
    t0 = time.perf_counter()
    _, params = itk.elastix_registration_method(fi, mi, parameter_object=po, log_to_console=False, number_of_threads=threads)
    seconds = time.perf_counter() - t0
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii into the cwd
        os.chdir(tmp)
        try:
            field = itk.transformix_deformation_field(mi, params)
            arr = np.asarray(itk.array_from_image(field)).transpose(2, 1, 0, 3).astype(np.float32)
        finally:
            os.chdir(here)
    return DisplacementFieldTransform(Image(arr, fixed.affine.copy())), None, seconds


OURS = ("ours", "ours-io", "ours-refine", "ours-io-refine")
QUALITIES = ("ours-fast", "ours-default", "ours-best")  # the --quality presets of the model config
METHODS = OURS + QUALITIES + ("syn-default", "syn", "elastix")


def run_ours(fixed_path: Path, moving_path: Path, model, method: str, args):
    """ours: the network alone; -io: + instance optimisation of the weights (args.io_steps);
    -refine: + the fine-grid velocity refinement (args.refine_iterations, None = the model's);
    ours-<quality>: the model config's quality preset, as ``--quality`` runs it.

    Timed end to end as the CLI runs it: read both images, register (on ``model.device``), write
    both fields (``--write-ext``). The inverse is computed (for the ICE) unless ``--forward-only``
    (then neither solved nor written); the times without it
    (``seconds_without_inverse``, ``seconds_end_to_end_without_inverse``) are the ones of a
    forward registration, since the CLI solves the inverse only when asked. Returns
    ``(forward, inverse, seconds of the registration call, extra records)``."""
    from diffusionreg.deformable.register import register_deformable, wait_for
    from diffusionreg.image import read_image
    from diffusionreg.transforms import write_transform

    wait_for(model.device)
    t_start = time.perf_counter()
    fixed = read_image(fixed_path)
    moving = read_image(moving_path)
    t0 = time.perf_counter()
    if method in QUALITIES:
        quality = method.removeprefix("ours-")
        result = register_deformable(fixed, moving, model, None, want_inverse=not args.forward_only, quality=quality)
    else:
        io_steps = args.io_steps if "-io" in method else 0
        refine = args.refine_iterations if "refine" in method else 0  # None: the model's default
        result = register_deformable(
            fixed, moving, model, None, io_steps, want_inverse=not args.forward_only, refine_iterations=refine
        )
    wait_for(model.device)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t_write = time.perf_counter()
        write_transform(result.forward, Path(tmp) / f"forward{args.write_ext}")
        seconds_write_forward = time.perf_counter() - t_write
        if result.inverse is not None:
            write_transform(result.inverse, Path(tmp) / f"inverse{args.write_ext}")
        t_end = time.perf_counter()
    kept = (
        "quality",
        "instance_optimization_steps",
        "instance_optimization_frozen_steps",
        "refine_iterations",
        "refine_coarse_iterations",
        "field_grid_shape",
    )
    extra = {k: v for k, v in result.metrics.items() if k.startswith(("seconds_", "refine_support_")) or k in kept}
    extra["seconds_read_both"] = round(t0 - t_start, 3)
    extra["seconds_write_both"] = round(t_end - t_write, 3)
    extra["seconds_write_forward"] = round(seconds_write_forward, 3)
    # The CLI solves the inverse only with --output-inverse-transform (SyN gives its inverse as a
    # by-product), so the time without it is the fair one for a forward registration.
    inverse_seconds = sum(result.metrics.get(k, 0.0) for k in ("seconds_inverse_field", "seconds_inverse_solve"))
    extra["seconds_without_inverse"] = round(seconds - inverse_seconds, 3)
    extra["seconds_end_to_end"] = round(t_end - t_start, 3)
    extra["seconds_end_to_end_without_inverse"] = round(
        (t_end - t_start) - inverse_seconds - (t_end - t_write - seconds_write_forward), 3
    )
    extra["device"] = str(model.device)
    if model.device.type == "cuda":
        import torch

        extra["device_name"] = torch.cuda.get_device_name(model.device)
    extra["write_ext"] = args.write_ext
    extra["forward_only"] = bool(args.forward_only)
    return result.forward, result.inverse, seconds, extra


def warm_up(model, fixed_path: Path, moving_path: Path) -> float:
    """One short untimed registration on ``model.device`` (CUDA context, cuDNN handles, kernel
    loading happen on the first call): seconds taken. The benchmark's times exclude it."""
    from diffusionreg.deformable.register import register_deformable, wait_for
    from diffusionreg.image import read_image

    t0 = time.perf_counter()
    register_deformable(
        read_image(fixed_path), read_image(moving_path), model, None, io_steps=1, refine_iterations=2, want_inverse=False
    )
    wait_for(model.device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- tasks
def binarised(image):
    from diffusionreg.image import Image

    return Image((image.array > 0).astype(np.float32), image.affine)


def lung_case(case: str, method: str, args, models) -> dict:
    from diffusionreg.evaluation import read_landmarks
    from diffusionreg.image import read_image, resample

    fixed_path, moving_path = LUNG / f"case_{case}_1.nii.gz", LUNG / f"case_{case}_2.nii.gz"
    fixed = read_image(fixed_path)
    moving = read_image(moving_path)
    lm = read_landmarks(LUNG / f"case_{case}_landmarks_voxel.csv", fixed.grid, moving.grid)
    eval_grid = coarse_grid(fixed.grid, 2.0)
    eval_moving = coarse_grid(moving.grid, 2.0)
    extra = {}
    if method in OURS + QUALITIES:
        fwd, inv, seconds, extra = run_ours(fixed_path, moving_path, models["lung"], method, args)
    else:
        bf = resample(binarised(fixed), coarse_grid(fixed.grid, args.baseline_spacing), None, "linear")
        bm = resample(binarised(moving), coarse_grid(moving.grid, args.baseline_spacing), None, "linear")
        fwd, inv, seconds = run_baseline(method, bf, bm, args.threads)
    out = {
        "task": "lung",
        "case": case,
        "method": method,
        "seconds": seconds,
        "tre_initial_mm": float(np.linalg.norm(lm.fixed - lm.moving, axis=1).mean()),
        **extra,
    }
    out.update(tre(fwd, lm.fixed, lm.moving))
    out.update(regularity(fwd, eval_grid))
    if inv is not None:
        out.update(inverse_consistency(fwd, inv, eval_moving, fixed.grid))
    return out


def brain_inputs(args):
    """Fixed oasis_A, moving vxm after the shared ANTs affine, both cropped to the fixed brain box;
    the pair is also written (once) to ``bench/out/deformable_brain_inputs/`` so that our methods
    are timed from reading files, as the CLI runs. The affine is computed once with antspyx and
    kept in ``bench/out/deformable_brain_affine.mat``; with that file present antspyx is not needed."""
    from diffusionreg.image import Image, crop_or_pad, read_image, resample, write_image
    from diffusionreg.transforms import read_transform

    b = DATA / "brain"
    fixed = read_image(b / "oasis_A_norm.nii.gz", dtype=np.float32)
    fixed_lab = read_image(b / "oasis_A_seg13.nii.gz")
    moving = read_image(b / "vxm_test_scan_T1.nii.gz", dtype=np.float32)
    aseg = read_image(b / "vxm_test_scan_aseg.nii.gz")
    merged = np.zeros(aseg.shape, np.uint8)
    for label, codes in ASEG13.items():
        merged[np.isin(aseg.array, codes)] = label
    moving_lab = Image(merged, aseg.affine)
    CACHE.mkdir(parents=True, exist_ok=True)
    mat = OUT / "deformable_brain_affine.mat"  # shared by all runs
    if not mat.exists():
        import shutil

        import ants

        reg = ants.registration(to_ants(fixed), to_ants(moving), type_of_transform="Affine", verbose=False)
        shutil.copy(reg["fwdtransforms"][0], mat)
    affine = read_transform(mat)
    fg = np.argwhere(fixed.array > 0.01)
    lo, hi = np.maximum(fg.min(0) - 8, 0), np.minimum(fg.max(0) + 9, fixed.shape)
    fixed_c = crop_or_pad(fixed, lo, hi - lo)
    fixed_lab_c = crop_or_pad(fixed_lab, lo, hi - lo)
    moving_a = resample(moving, fixed_c.grid, affine, "linear")
    moving_lab_a = resample(moving_lab, fixed_c.grid, affine, "nearest")
    folder = OUT / "deformable_brain_inputs"
    paths = (folder / "fixed.nii.gz", folder / "moving_affine.nii.gz")
    if not all(p.exists() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        write_image(fixed_c, paths[0])
        write_image(moving_a, paths[1])
    return fixed_c, fixed_lab_c, moving_a, moving_lab_a, paths


def brain_case(method: str, args, models) -> dict:
    from diffusionreg import metrics
    from diffusionreg.image import resample

    fixed, fixed_lab, moving, moving_lab, paths = brain_inputs(args)
    extra = {}
    if method in OURS + QUALITIES:
        if models.get("brain") is None:
            return {"task": "brain", "case": "vxm->oasisA", "method": method, "skipped": "no brain model"}
        fwd, inv, seconds, extra = run_ours(*paths, models["brain"], method, args)
        extra["model"] = models["brain"].name
    else:
        bf = resample(fixed, coarse_grid(fixed.grid, args.baseline_spacing), None, "linear")
        bm = resample(moving, coarse_grid(moving.grid, args.baseline_spacing), None, "linear")
        fwd, inv, seconds = run_baseline(method, bf, bm, args.threads)
    warped = resample(moving_lab, fixed.grid, fwd, "nearest")
    labels = sorted(SEG13_NAMES)
    dice = metrics.dice_per_label(fixed_lab.array, warped.array, labels)
    hd = metrics.hd95_per_label(fixed_lab.array, warped.array, fixed.spacing, labels)
    dice0 = metrics.dice_per_label(fixed_lab.array, moving_lab.array, labels)
    out = {
        "task": "brain",
        "case": "vxm->oasisA",
        "method": method,
        "seconds": seconds,
        **extra,
        "dice_mean": float(np.nanmean(list(dice.values()))),
        "hd95_mean_mm": float(np.nanmean(list(hd.values()))),
        "dice_affine_only": float(np.nanmean(list(dice0.values()))),
        "dice_per_structure": {SEG13_NAMES[k]: round(v, 4) for k, v in dice.items()},
    }
    out.update(regularity(fwd, coarse_grid(fixed.grid, 2.0)))
    if inv is not None:
        out.update(inverse_consistency(fwd, inv, coarse_grid(fixed.grid, 2.0), fixed.grid))
    return out


# ----------------------------------------------------------------------------- report
def load_cache() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]


def fmt(v, digits=2):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


STAGES = (
    "read_both",
    "preprocess",
    "instance_optimization",
    "network",
    "refine_preprocess",
    "refine",
    "forward_field",
    "inverse_field",
    "inverse_solve",
    "metrics",
    "write_both",
)


def stage_table(results: list[dict]) -> list[str]:
    """Markdown lines: our jobs' device, per-stage seconds (CUDA synchronised before each stage
    timer is read) and end-to-end time (read, register, write) with and without the inverse."""
    ours = [r for r in results if "seconds_end_to_end" in r]
    if not ours:
        return []
    lines = [
        "## Our methods: stage profile (s)",
        "",
        "End to end = read both images + register + write both fields (the CLI's work); 'forward only' leaves "
        "out the inverse's stages and its write (the CLI solves it only when asked). A CUDA run's first "
        "call (context start) is a warm-up outside these times.",
        "",
        "| task | case | method | device | " + " | ".join(STAGES) + " | end to end | forward only |",
        "|---|---|---|---|" + "---|" * (len(STAGES) + 2),
    ]
    for r in ours:
        cells = [fmt(r.get(f"seconds_{stage}"), 2) if f"seconds_{stage}" in r else "-" for stage in STAGES]
        device = r.get("device_name", r.get("device", "cpu"))
        lines.append(
            f"| {r['task']} | {r['case']} | {r['method']} | {device} | " + " | ".join(cells) + " | "
            f"{fmt(r['seconds_end_to_end'])} | {fmt(r.get('seconds_end_to_end_without_inverse'))} |"
        )
    return lines + [""]


def report(results: list[dict], args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv[1:])
    if "--note" in argv:
        i = argv.index("--note")
        del argv[i : i + 2]
    lines = [
        "# Deformable benchmark",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/deformable.py'] + argv)}`  ",
        f"Threads per method: {args.threads}; baselines on binarised maps / images at {args.baseline_spacing} mm; "
        f"ours on its network grid, instance optimisation {args.io_steps} steps for the -io methods, "
        f"velocity refinement ({args.refine_iterations if args.refine_iterations is not None else 'the model default'} iterations) for the -refine methods. "
        "Machine: 2 shared CPU cores (other jobs running), so wall times are indicative.",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    lung = [r for r in results if r["task"] == "lung"]
    if lung:
        n_cases = len({r["case"] for r in lung})
        lines += [
            f"## Lung vessels ({n_cases} of the 8 CC-BY validation pairs, Lung250M-4B landmarks)",
            "",
            "| method | cases | TRE mean (mm) | TRE median | q25 / q75 | initial TRE | folding % | NDV % | "
            "ICE mean (mm) | ICE p95 | time / pair (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            rs = [r for r in lung if r["method"] == method]
            if not rs:
                continue
            allt = np.concatenate([r["tre_values"] for r in rs])
            init = np.mean([r["tre_initial_mm"] for r in rs])
            ice = [r["ice_mean_mm"] for r in rs if "ice_mean_mm" in r]
            ice95 = [r["ice_p95_mm"] for r in rs if "ice_p95_mm" in r]
            lines.append(
                f"| {method} | {len(rs)} | {allt.mean():.2f} | {np.median(allt):.2f} | "
                f"{np.percentile(allt, 25):.2f} / {np.percentile(allt, 75):.2f} | {init:.2f} | "
                f"{np.mean([r['folding_percent'] for r in rs]):.4f} | {np.mean([r['ndv_percent'] for r in rs]):.4f} | "
                f"{fmt(np.mean(ice), 3) if ice else 'n/a'} | {fmt(np.mean(ice95), 3) if ice95 else 'n/a'} | "
                f"{np.mean([r['seconds'] for r in rs]):.1f} |"
            )
        present = [m for m in METHODS if any(r["method"] == m for r in lung)]
        lines += [
            "",
            "Per case TRE mean (mm):",
            "",
            "| case | initial | " + " | ".join(present) + " |",
            "|---|---|" + "---|" * len(present),
        ]
        for case in sorted({r["case"] for r in lung}):
            row = [r for r in lung if r["case"] == case]
            cells = []
            for m in present:
                hit = [r for r in row if r["method"] == m]
                cells.append(fmt(hit[0]["tre_mean_mm"]) if hit else "-")
            lines.append(f"| {case} | {fmt(row[0]['tre_initial_mm'])} | " + " | ".join(cells) + " |")
        lines.append("")
    brain = [r for r in results if r["task"] == "brain"]
    if brain:
        lines += [
            "## Brain (vxm_test_scan -> oasis_A, 13 structures, after a shared ANTs affine)",
            "",
            "| method | Dice mean | HD95 mean (mm) | Dice affine only | folding % | NDV % | ICE mean (mm) | time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in brain:
            if "skipped" in r:
                lines.append(f"| {r['method']} | {r['skipped']} | | | | | | |")
                continue
            label = r["method"] + (f" ({r['model']})" if r.get("model") else "")
            lines.append(
                f"| {label} | {r['dice_mean']:.4f} | {r['hd95_mean_mm']:.2f} | {r['dice_affine_only']:.4f} | "
                f"{r['folding_percent']:.4f} | {r['ndv_percent']:.4f} | {fmt(r.get('ice_mean_mm'), 3)} | "
                f"{r['seconds']:.1f} |"
            )
        lines.append("")
    lines += stage_table(results)
    (OUT / f"{REPORT}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"{REPORT}.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        methods = [m for m in METHODS if any(r["method"] == m for r in lung)]
        if methods:
            data = [np.concatenate([r["tre_values"] for r in lung if r["method"] == m]) for m in methods]
            axes[0].boxplot(data, showfliers=False)
            axes[0].set_xticks(range(1, len(methods) + 1), methods)
            axes[0].set_ylabel("TRE (mm)")
            axes[0].set_title("Lung landmarks (8 pairs)")
            axes[1].bar(methods, [np.mean([r["seconds"] for r in lung if r["method"] == m]) for m in methods])
            axes[1].set_ylabel("seconds / pair")
            axes[1].set_title("Wall time (lung)")
        fig.tight_layout()
        fig.savefig(OUT / f"{REPORT}.png", dpi=100)
    except Exception as exc:
        print(f"plot failed: {exc}")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="ours,ours-io,syn,elastix")
    ap.add_argument("--lung-cases", default="all")
    ap.add_argument("--brain", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-spacing", type=float, default=2.0)
    ap.add_argument("--io-steps", type=int, default=50)
    ap.add_argument(
        "--refine-iterations",
        type=int,
        default=None,
        help="velocity-refinement iterations of the -refine methods (default: the model's)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device of OUR methods (cpu, cuda, cuda:N); the baselines always run on the CPU",
    )
    ap.add_argument(
        "--write-ext",
        default=".nii.gz",
        choices=(".nii.gz", ".nii", ".nrrd", ".mha"),
        help="file type the timed write of our fields uses (.nii.gz compresses, ~10x slower to write)",
    )
    ap.add_argument(
        "--forward-only",
        action="store_true",
        help="our methods without the inverse field (as the CLI without --output-inverse-transform; no ICE)",
    )
    ap.add_argument("--lung-model", default="lung-vessels")
    ap.add_argument("--brain-model", default=None)
    ap.add_argument("--run-name", default="", help="separate cache and report: bench/out/deformable_<name>.*")
    ap.add_argument("--reuse", action="store_true", help="keep cached results (skip cases already done)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="text added under the command line (e.g. the runs merged)")
    args = ap.parse_args()
    global CACHE, REPORT
    if args.run_name:
        CACHE = OUT / f"deformable_cache_{args.run_name}"
        REPORT = f"deformable_{args.run_name}"
    import torch

    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        methods = [m for m in args.methods.split(",") if m]
        models = {}
        unknown = set(methods) - set(METHODS)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; use {', '.join(METHODS)}")
        cases = LUNG_CASES if args.lung_cases == "all" else tuple(c for c in args.lung_cases.split(",") if c)
        if any(m in OURS + QUALITIES for m in methods):
            from diffusionreg.deformable.register import load_model
            from diffusionreg.devices import resolve_device

            device = resolve_device(args.device)
            models["lung"] = load_model(args.lung_model, device=device)
            models["brain"] = load_model(args.brain_model, device=device) if args.brain_model else None
            if device.type == "cuda":  # the first CUDA call starts the context: not part of any timed job
                if cases:
                    warm = warm_up(models["lung"], LUNG / f"case_{cases[0]}_1.nii.gz", LUNG / f"case_{cases[0]}_2.nii.gz")
                    print(f"warm-up (lung model, excluded from the times): {warm:.1f} s", flush=True)
                if args.brain and models["brain"] is not None:
                    warm = warm_up(models["brain"], *brain_inputs(args)[-1])
                    print(f"warm-up (brain model, excluded from the times): {warm:.1f} s", flush=True)
        # method by method (in the order given), so that a run stopped early has every case of the first methods
        jobs = [("lung", c, m) for m in methods for c in cases]
        if args.brain:
            jobs += [("brain", "vxm-oasisA", m) for m in methods]
        for task, case, method in jobs:
            path = CACHE / f"{task}_{case}_{method}.json"
            if args.reuse and path.exists():
                continue
            print(f"{task} {case} {method} ...", flush=True)
            load_before = os.getloadavg()[0]
            result = lung_case(case, method, args, models) if task == "lung" else brain_case(method, args, models)
            result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
            result["threads"] = args.threads
            path.write_text(json.dumps(result))
            print(
                f"  {json.dumps({k: v for k, v in result.items() if k not in ('tre_values', 'dice_per_structure')})}", flush=True
            )
    report(load_cache(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
