"""Midline-shift benchmark: synthetic shifts of a held-out normal head, and normal controls.

Synthetic cases are made with ``diffusionreg.midline.synthetic.synth_case`` from the held-out head
(never in training; the GE HiSpeed series with its gantry tilt by default): peaks of 0-15 mm in the
head's own millimetres, both sides, hyperdense and hypodense lesions, pitched/turned heads, 5 mm
slices, noise. Each case is measured by the whole pipeline (pose included) from the image in
memory. Metrics: MAE (mm) of the case MLS, the mean reading on 0 mm cases (bias), AUC and
sensitivity/specificity at 5 mm, seconds per case, peak memory. Controls: the real normal scans
as they are (their truth is 0 mm; MLS < 2 mm is the target).

    .venv/bin/python bench/midline.py --model PATH_OR_NAME [--threads 1] [--cases 14]

Writes bench/out/midline.json and bench/out/midline.md (copy the table into bench/results/midline.md).
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

from diffusionreg.image import read_image
from diffusionreg.midline.heads import brain_median_hu, load_normal_head, pose_template, template_head
from diffusionreg.midline.measure import measure_midline
from diffusionreg.midline.model_loading import load_midline_model
from diffusionreg.midline.synthetic import Acquisition, draw_mass_effect, synth_case

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


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)

    model, name = load_midline_model(args.model)
    cfg = model.cfg
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
        start = time.monotonic()
        result = measure_midline(image, model, name)
        seconds = time.monotonic() - start
        record = {
            "case": index,
            "truth_mm": truth["case_mls_mm"],
            "truth_side": truth["side"],
            "measured_mm": result.case_mls_mm,
            "measured_side": result.side,
            "error_mm": result.case_mls_mm - truth["case_mls_mm"],
            "lesion": lesion,
            "slice_mm": acquisition.slice_mm,
            "rotation_deg": acquisition.rotation_deg,
            "hu_offset": acquisition.hu_offset,
            "seconds": seconds,
        }
        cases.append(record)
        print(json.dumps(record), flush=True)
    controls = []
    for path in args.controls:
        image = read_image(path, what="control", dtype=np.float32)
        start = time.monotonic()
        result = measure_midline(image, model, name)
        controls.append(
            {"control": path.name, "measured_mm": result.case_mls_mm, "side": result.side, "seconds": time.monotonic() - start}
        )
        print(json.dumps(controls[-1]), flush=True)
    truth = np.array([c["truth_mm"] for c in cases])
    measured = np.array([c["measured_mm"] for c in cases])
    positive = truth >= THRESHOLD_MM
    flagged = measured >= THRESHOLD_MM
    summary = {
        "model": name,
        "held_out": str(args.held_out),
        "cases": len(cases),
        "mae_mm": float(np.mean(np.abs(measured - truth))),
        "bias_on_normals_mm": float(np.mean(measured[truth == 0])) if np.any(truth == 0) else float("nan"),
        "auc_5mm": auc(measured, positive),
        "sensitivity_5mm": float(np.mean(flagged[positive])) if positive.any() else float("nan"),
        "specificity_5mm": float(np.mean(~flagged[~positive])) if (~positive).any() else float("nan"),
        "side_correct": float(np.mean([c["measured_side"] == c["truth_side"] for c in cases if c["truth_mm"] > 0])),
        "seconds_per_case_mean": float(np.mean([c["seconds"] for c in cases])),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": args.threads,
        "controls": controls,
        "brain_median_hu_held_out": brain_median_hu(head.volume.numpy()),
    }
    (OUT / "midline.json").write_text(json.dumps({"summary": summary, "cases": cases}, indent=2))
    lines = [
        f"model {name}; held-out head {args.held_out.name}; {len(cases)} synthetic cases; {args.threads} thread(s)",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.3f} |" for k, v in summary.items() if isinstance(v, float)),
        "",
        "| case | truth mm | measured mm | side truth/measured | lesion | slice mm | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {c['case']} | {c['truth_mm']:.2f} | {c['measured_mm']:.2f} | {c['truth_side']}/{c['measured_side']} | "
            f"{c['lesion']} | {c['slice_mm']:g} | {c['seconds']:.1f} |"
            for c in cases
        ),
        "",
        "| control | measured mm | side | s |",
        "| --- | --- | --- | --- |",
        *(f"| {c['control']} | {c['measured_mm']:.2f} | {c['side']} | {c['seconds']:.1f} |" for c in controls),
    ]
    (OUT / "midline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
