"""``diffusionreg midline synth``: a synthetic head CT of known midline shift and its truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusionreg.errors import InputError, ParameterError
from diffusionreg.vocabulary import EXIT_OK

from .config import compact
from .heads import load_normal_head, pose_template, template_head
from .synthetic import Acquisition, draw_mass_effect, synth_case

#: Largest peak the generator accepts (mm): beyond it the field would fold at the skull.
MAX_SHIFT_MM = 25.0


def run_synth(args: argparse.Namespace, progress) -> int:
    import dataclasses

    from diffusionreg.image import OUTPUT_IMAGE_SUFFIXES, write_image
    from diffusionreg.outputs import OutputSet

    if args.output is None or args.output_truth is None:
        raise InputError("midline synth needs --output (the CT) and --output-truth (JSON)")
    if args.shift_mm is not None and not 0.0 <= args.shift_mm <= MAX_SHIFT_MM:
        raise ParameterError("shift_mm", f"must be within 0..{MAX_SHIFT_MM:g} mm, got {args.shift_mm}")
    if args.slice_mm <= 0 or args.pixel_mm <= 0:
        raise InputError("--slice-mm and --pixel-mm must be > 0")
    outputs = OutputSet.from_args(args, ("--normal-head",), progress)
    outputs.add("--output", args.output, OUTPUT_IMAGE_SUFFIXES)
    outputs.add("--output-truth", args.output_truth, (".json",))
    cfg = compact()
    gen = torch.Generator().manual_seed(int(args.seed))
    with outputs:
        with progress.stage("read", total=1) as stage:
            if args.normal_head is None:
                head = template_head(Path(args.template_dir))
            else:
                head = load_normal_head(args.normal_head, pose_template(Path(args.template_dir)), cfg.inference, progress.log)
                head.brain = template_head(Path(args.template_dir)).brain
            stage.update(message=head.name)
        effect = draw_mass_effect(cfg.synth, cfg.frame, gen, peak_mm=None if args.shift_mm is None else args.shift_mm)
        changes = {}
        if args.side is not None:
            side = 1 if args.side == "left" else -1
            if side != effect.side:
                centre = effect.lesion_centre_mm
                changes.update(side=side, lesion_centre_mm=(2 * effect.midline_x_mm - centre[0], centre[1], centre[2]))
        if args.lesion is not None:
            low, high = cfg.synth.lesion_hu[0 if args.lesion == "hyperdense" else 1]
            changes["lesion_hu"] = 0.5 * (low + high)
        effect = dataclasses.replace(effect, **changes)
        scale = float(abs(torch.det(torch.as_tensor(head.pose[:3, :3]))) ** (1 / 3))
        if args.shift_mm is not None:  # the requested shift is in the head's own millimetres
            effect = dataclasses.replace(effect, peak_mm=args.shift_mm / scale)
        acquisition = Acquisition(
            rotation_deg=tuple(args.rotation_deg),
            pixel_mm=args.pixel_mm,
            slice_mm=args.slice_mm,
            noise_hu=args.noise_hu,
            hu_offset=args.hu_offset,
        )
        with progress.stage("synthesise", total=1) as stage:
            image, truth = synth_case(head, effect, cfg.frame, acquisition, gen)
            stage.update()
        truth["normal_head"] = head.name
        truth["seed"] = int(args.seed)
        write_image(image, outputs.temporary("--output"))
        outputs.temporary("--output-truth").write_text(json.dumps(truth, indent=2), encoding="utf-8")
        outputs.commit()
    progress.log(f"wrote {args.output}: midline shift {truth['case_mls_mm']:.2f} mm ({truth['side']})")
    return EXIT_OK
