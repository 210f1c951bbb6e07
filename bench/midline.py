"""Midline-shift benchmark: synthetic shifts of a held-out normal head, and normal controls.

Synthetic cases are made with ``diffusionreg.midline.synthetic.synth_case`` from the held-out head
(never in training; the GE HiSpeed series with its gantry tilt by default): peaks of 0-15 mm in the
head's own millimetres, both sides, hyperdense and hypodense lesions, pitched/turned heads, 5 mm
slices, noise. Each case is measured by the whole pipeline (pose included) from the image in
memory. Metrics: MAE (mm) of the case MLS, the mean reading on 0 mm cases (bias), AUC and
sensitivity/specificity at 5 mm, seconds per case, peak memory. Controls: the real normal scans
as they are (their truth is 0 mm; MLS < 2 mm is the target).

    .venv/bin/python bench/midline.py --model PATH_OR_NAME [--threads 1] [--cases 14] [--methods ours,registration]

The registration-only peer (``--methods registration``; both methods run by default, on the same
cases): the symmetric normal template (the SCCT head the pose step uses, in the pipeline's HU
window) is registered onto the case by our deformable registration (``register_deformable`` with
the ``--deformable-model``'s config defaults, after the same pose step), and the MLS is how far
the template's midsagittal points move sideways in the case: the points of the plane ``x = 0`` at
each measured level, between the falx attachments (less the read-out's margin) of the template's
own brain; per slice the largest lateral displacement relative to the pose (CT mm), case = the
largest slice, side from its sign (column ``registration``). The same registration is also read
relative to the line through the moved falx attachments (column ``registration_falx_line``), so
that a sideways drift or turn of the whole registered head does not count as a shift.

    .venv/bin/python bench/midline.py --methods registration [--model PATH] [--output-name midline_peer]

Writes bench/out/<output-name>.json and .md (default ``midline``; copy the tables into
bench/results/midline.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusionreg.deformable.register import DeformableModel, load_model, register_deformable, world_field
from diffusionreg.image import Grid, Image, read_image
from diffusionreg.midline.config import MidlineConfig
from diffusionreg.midline.headframe import intracranial_mask, midline_column, slab_hu, slice_affine, window
from diffusionreg.midline.heads import brain_median_hu, load_normal_head, pose_template, template_head
from diffusionreg.midline.measure import SIDE_MIN_MM, measure_midline, template_image
from diffusionreg.midline.model_loading import load_midline_model
from diffusionreg.midline.pose import align_to_template, check_head_ct, to_hounsfield
from diffusionreg.midline.readout import falx_rows
from diffusionreg.midline.synthetic import Acquisition, draw_mass_effect, measured_levels, synth_case
from diffusionreg.transforms import AffineTransform

OUT = ROOT / "bench" / "out"
DATA = ROOT.parent / "shared" / "data" / "headct"
THRESHOLD_MM = 5.0
#: (peak mm in the head's millimetres, side, lesion) of the synthetic cases, in order.
PLAN = [
    (0.0, 1, "hyperdense"),
    (0.0, -1, "hypodense"),
    (0.0, 1, "hypodense"),
    (0.0, -1, "hyperdense"),
    (2.5, 1, "hyperdense"),
    (2.5, -1, "hypodense"),
    (5.0, -1, "hyperdense"),
    (5.0, 1, "hypodense"),
    (7.5, 1, "hyperdense"),
    (7.5, -1, "hypodense"),
    (10.0, -1, "hyperdense"),
    (10.0, 1, "hypodense"),
    (12.5, 1, "hyperdense"),
    (15.0, -1, "hypodense"),
]


METHODS = ("ours", "registration")
#: The result columns of each method (the peer's one registration is read out two ways).
COLUMNS = {"ours": ("ours",), "registration": ("registration", "registration_falx_line")}
#: The registration peer's deformable model (Models.json name): the one deformable model for heads.
PEER_MODEL = "brain-mri"


def windowed(image: Image, cfg: MidlineConfig) -> Image:
    """HU -> the midline model's input window, as [0, 1] (the deformable model's input range)."""
    values = window(torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32)), cfg.frame)
    return image.with_array(((values + 1.0) / 2.0).numpy())


def template_midline_shift(
    case_hu: Image,
    template_hu: Image,
    pose: np.ndarray,
    cfg: MidlineConfig,
    deformable: DeformableModel,
    refine_iterations: int | None = None,
    io_steps: int | None = None,
) -> dict:
    """The registration peer's reading of ``case_hu`` (HU) given its ``pose`` (template LPS -> CT LPS).

    ``template_hu`` is registered onto the case (fixed = case, moving = template, initial transform
    the pose's inverse; both in the model's HU window) with ``deformable``'s config defaults
    (``refine_iterations`` / ``io_steps`` override them, None: the config's). Its inverse map on the
    network grid carries each template point ``m`` to the case point ``phi(m)``; the lateral shift
    of ``m`` is ``(phi(m) - pose(m))`` along the pose's image of the template's +x axis, in CT mm
    (+: towards the patient's left). Points: the template's midsagittal column of each measured
    slice, between its falx attachments less ``falx_margin_mm`` (as the pipeline's read-out).
    Returns the case MLS (mm), side, slice of the maximum and per-slice lateral shifts of this
    reading, the same under ``falx_line`` for the shifts relative to the line through the moved
    attachments (interpolated along the column), the per-slice rows and seconds.
    """
    frame = cfg.frame
    start = time.monotonic()
    registration = register_deformable(
        windowed(case_hu, cfg),
        windowed(template_hu, cfg),
        deformable,
        initial=AffineTransform(np.linalg.inv(pose)),
        io_steps=io_steps,
        want_inverse=False,
        refine_iterations=refine_iterations,
    )
    levels = measured_levels(frame)
    template_slices = slab_hu(
        torch.from_numpy(np.ascontiguousarray(template_hu.array, dtype=np.float32)),
        template_hu.affine,
        torch.eye(4, dtype=torch.float64),
        frame,
        levels,
        [frame.slice_mm] * len(levels),
    )
    column = midline_column(frame)
    lateral = pose[:3, 0] / np.linalg.norm(pose[:3, 0])  # the template's +x (patient left) in the CT
    slices = []
    for index, z in enumerate(levels):
        brain = intracranial_mask(template_slices[index, 0].numpy())
        rows = falx_rows(brain, column, frame.falx_margin_mm / frame.pixel_mm)
        if rows is None:
            continue  # no closed skull or no brain on the template's midline at this level
        first, last = falx_rows(brain, column, 0.0)  # the falx attachments themselves
        # The midline column as a (1, n, 1) grid: slice pixel (column, first + j, 0) -> CT LPS through the pose.
        points = slice_affine(frame, z) @ np.array(
            [[1.0, 0.0, 0.0, column], [0.0, 1.0, 0.0, first], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
        )
        in_ct = pose @ points
        moved = world_field(registration.w, registration.grid, Grid((1, last - first + 1, 1), in_ct), reference=in_ct)
        shift = moved.reshape(-1, 3).astype(np.float64) @ lateral
        # Relative to the line through the moved attachments (the case's own ideal midline): a
        # sideways drift or turn of the whole registered head is not a shift of the midline.
        fraction = np.arange(len(shift)) / max(len(shift) - 1, 1)
        relative = shift - (shift[0] + fraction * (shift[-1] - shift[0]))
        read = slice(rows[0] - first, rows[1] - first + 1)
        row = {"index": index, "z_template_mm": z}
        for key, values in (("pose", shift[read]), ("falx_line", relative[read])):
            k = int(np.argmax(np.abs(values)))
            row[key] = {"mls_mm": float(abs(values[k])), "lateral_mm": float(values[k])}
        slices.append(row)

    def case_reading(key: str) -> dict:
        best = max(slices, key=lambda r: r[key]["mls_mm"]) if slices else None
        mls = best[key]["mls_mm"] if best is not None else 0.0
        side = "none" if best is None or mls < SIDE_MIN_MM else ("left" if best[key]["lateral_mm"] > 0 else "right")
        return {
            "case_mls_mm": mls,
            "side": side,
            "max_slice": best["index"] if best is not None else None,
            "slice_lateral_mm": [round(r[key]["lateral_mm"], 3) for r in slices],
        }

    return {
        **case_reading("pose"),
        "falx_line": case_reading("falx_line"),
        "slices": slices,
        "registration_seconds": time.monotonic() - start,
        "refine_loss_first": registration.metrics["refine_loss_first"],
        "refine_loss_last": registration.metrics["refine_loss_last"],
    }


def registration_peer(ct: Image, template_hu: Image, cfg: MidlineConfig, deformable: DeformableModel) -> dict:
    """The peer on a CT as the pipeline receives it: the same HU detection, check and pose step as
    :func:`measure_midline`, then :func:`template_midline_shift`."""
    ct, _ = to_hounsfield(ct)
    check_head_ct(ct, cfg.inference)
    pose = align_to_template(ct, template_hu, cfg.inference)
    return template_midline_shift(ct, template_hu, pose.matrix, cfg, deformable)


def read_case(method: str, ct: Image, context: dict) -> dict:
    """Readings of ``ct`` by ``method`` (MLS mm, side, seconds with the pose step), by column
    name: ``ours``; ``registration`` and ``registration_falx_line`` (one registration, two read-outs)."""
    start = time.monotonic()
    if method == "ours":
        result = measure_midline(ct, context["model"], context["name"])
        slices = {f"{s.z_template_mm:g}": round(s.mls_mm, 3) for s in result.slices}  # template z (mm) -> slice MLS
        return {
            "ours": {
                "measured_mm": result.case_mls_mm,
                "measured_side": result.side,
                "slice_mls_mm": slices,
                "seconds": time.monotonic() - start,
            }
        }
    reading = registration_peer(ct, context["template"], context["cfg"], context["deformable"])
    seconds = time.monotonic() - start
    out = {}
    for column, part in (("registration", reading), ("registration_falx_line", reading["falx_line"])):
        out[column] = {
            "measured_mm": part["case_mls_mm"],
            "measured_side": part["side"],
            "max_slice": part["max_slice"],
            "slice_lateral_mm": part["slice_lateral_mm"],
            "refine_loss": [reading["refine_loss_first"], reading["refine_loss_last"]],
            "seconds": seconds,
        }
    return out


def summarise(cases: list[dict], controls: list[dict], method: str) -> dict:
    """MAE, bias on 0 mm cases, AUC, sensitivity/specificity at 5 mm, side, seconds of ``method``."""
    truth = np.array([c["truth_mm"] for c in cases])
    measured = np.array([c[method]["measured_mm"] for c in cases])
    positive = truth >= THRESHOLD_MM
    flagged = measured >= THRESHOLD_MM
    shifted = [c for c in cases if c["truth_mm"] > 0]
    return {
        "mae_mm": float(np.mean(np.abs(measured - truth))),
        "bias_on_normals_mm": float(np.mean(measured[truth == 0])) if np.any(truth == 0) else float("nan"),
        "auc_5mm": auc(measured, positive),
        "sensitivity_5mm": float(np.mean(flagged[positive])) if positive.any() else float("nan"),
        "specificity_5mm": float(np.mean(~flagged[~positive])) if (~positive).any() else float("nan"),
        "side_correct": float(np.mean([c[method]["measured_side"] == c["truth_side"] for c in shifted]))
        if shifted
        else float("nan"),
        "seconds_per_case_mean": float(np.mean([c[method]["seconds"] for c in cases])),
        **{f"control_{c['control']}_mm": c[method]["measured_mm"] for c in controls},
    }


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def readings(row: dict, methods: list[str]) -> str:
    """Table cells of one case or control: each method's MLS (mm), side and seconds."""
    return " | ".join(f"{row[m]['measured_mm']:.2f} ({row[m]['measured_side']}, {row[m]['seconds']:.1f})" for m in methods)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the midline model (needed by 'ours'; its config is the frame of both)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--deformable-model", default=PEER_MODEL, help="the registration peer's deformable model")
    parser.add_argument("--held-out", type=Path, default=DATA / "ge_hispeed_head_tilt_dicom")
    parser.add_argument(
        "--controls",
        type=Path,
        nargs="*",
        default=[DATA / "ge_hispeed_head_tilt_dicom", DATA / "cthead_unc_cadaver_256x256x113.nii.gz"],
    )
    parser.add_argument("--template-dir", type=Path, default=DATA)
    parser.add_argument("--pose-cache", type=Path, default=None, help="poses of the held-out head (JSON, as in training)")
    parser.add_argument("--cases", type=int, default=len(PLAN))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output-name", default="midline", help="bench/out/<name>.json and .md")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    if "ours" in methods and args.model is None:
        parser.error("--methods ours needs --model")
    columns = [column for method in methods for column in COLUMNS[method]]
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)

    context: dict = {}
    if args.model is not None:
        context["model"], context["name"] = load_midline_model(args.model)
        cfg = context["model"].cfg
        context["template"] = template_image(context["model"])
    else:
        cfg = MidlineConfig()
        context["name"] = None
        context["template"] = pose_template(args.template_dir)
    context["cfg"] = cfg
    if "registration" in methods:
        context["deformable"] = load_model(args.deformable_model, "cpu")
    template = pose_template(args.template_dir)
    brain = template_head(args.template_dir)
    head = load_normal_head(args.held_out, template, cfg.inference, print, pose_cache=args.pose_cache)
    head.brain = brain.brain
    head_scale = float(np.cbrt(abs(np.linalg.det(head.pose[:3, :3]))))
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cases = []
    for index, (peak, side, lesion) in enumerate(PLAN[: args.cases]):
        effect = draw_mass_effect(cfg.synth, cfg.frame, gen, peak_mm=peak / head_scale)
        centre = effect.lesion_centre_mm
        if effect.side != side:
            centre = (2 * effect.midline_x_mm - centre[0], centre[1], centre[2])
        low, high = cfg.synth.lesion_hu[0 if lesion == "hyperdense" else 1]
        effect = dataclasses.replace(effect, side=side, lesion_centre_mm=centre, lesion_hu=float(rng.uniform(low, high)))
        acquisition = Acquisition(
            rotation_deg=tuple(float(v) for v in rng.uniform(-10, 10, 3)),
            shift_mm=tuple(float(v) for v in rng.uniform(-10, 10, 3)),
            slice_mm=float(rng.choice([2.5, 5.0, 5.0, 7.0])),
            pixel_mm=0.9,
            noise_hu=float(rng.uniform(1, 6)),
            hu_offset=1024.0 if index % 5 == 4 else 0.0,
        )
        image, truth = synth_case(head, effect, cfg.frame, acquisition, gen)
        record = {
            "case": index,
            "truth_mm": truth["case_mls_mm"],
            "truth_side": truth["side"],
            "lesion": lesion,
            "slice_mm": acquisition.slice_mm,
            "rotation_deg": acquisition.rotation_deg,
            "hu_offset": acquisition.hu_offset,
            **{column: value for method in methods for column, value in read_case(method, image, context).items()},
        }
        cases.append(record)
        print(json.dumps(record), flush=True)
    controls = []
    for path in args.controls:
        image = read_image(path, what="control", dtype=np.float32)
        by_column = {column: value for method in methods for column, value in read_case(method, image, context).items()}
        hu, _ = to_hounsfield(image)
        controls.append({"control": path.name, "brain_median_hu": brain_median_hu(hu.array), **by_column})
        print(json.dumps(controls[-1]), flush=True)
    summary = {
        "model": context["name"],
        "deformable_model": args.deformable_model if "registration" in methods else None,
        "methods": methods,
        "columns": columns,
        "held_out": str(args.held_out),
        "cases": len(cases),
        **{column: summarise(cases, controls, column) for column in columns},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": args.threads,
        "brain_median_hu_held_out": brain_median_hu(head.volume.numpy()),
    }
    (OUT / f"{args.output_name}.json").write_text(
        json.dumps({"summary": summary, "cases": cases, "controls": controls}, indent=2)
    )
    metrics = list(summary[columns[0]])
    lines = [
        f"model {context['name']}; peer {summary['deformable_model']}; held-out head {args.held_out.name}; "
        f"{len(cases)} synthetic cases; {args.threads} thread(s); peak memory {summary['peak_memory_mb']:.0f} MB",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
        *(f"| {k} | " + " | ".join(f"{summary[m][k]:.3f}" for m in columns) + " |" for k in metrics),
        "",
        "| case | truth mm | lesion | slice mm | " + " | ".join(f"{m} mm (side, s)" for m in columns) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(columns),
        *(
            f"| {c['case']} | {c['truth_mm']:.2f} ({c['truth_side']}) | {c['lesion']} | {c['slice_mm']:g} | "
            + readings(c, columns)
            + " |"
            for c in cases
        ),
        "",
        "| control | " + " | ".join(f"{m} mm (side, s)" for m in columns) + " |",
        "| --- |" + " --- |" * len(columns),
        *(f"| {c['control']} | " + readings(c, columns) + " |" for c in controls),
    ]
    (OUT / f"{args.output_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
