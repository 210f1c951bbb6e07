"""The registration-only peer of bench/midline.py reads a known shift.

The case is the pose template itself (the very image the peer registers) with a synthetic mass
effect of known peak from ``midline.synthetic``, acquired with no turn, no shift and no noise, so
the pose is the identity and is given (the pose search has its own tests). What remains is the
peer: our deformable registration (the shipped ``brain-mri`` model, network + velocity refinement)
and the lateral read-out of the template's midsagittal points, relative to the pose and to the
line through the moved falx attachments (the field is zero there, so both read the peak).

Tolerances: the truth is the field's peak. The read-out samples it at the measured levels (5 mm
apart, so at most 2.5 mm from the peak's z; sigma_z >= 15 mm loses <= 1.4 %) and on 3.6 mm rows
where the y-window is flat (<= 0.1 mm at 10 mm); that part is small. The registration is the
larger part: its field is smoothed (refinement control grid 4x the 2.5 mm network grid, a
smoothness term), so it under-reads a peak. On this image pair it read 8.2 mm (the effect below,
shifted right) and 9.3-9.5 mm (another draw, shifted left) of 10 mm, and 0.4 mm on the unshifted
head (0.7 mm relative to the falx line, whose ends carry the registration's noise near the skull).
So: within 2 mm (20 %) of 10 mm and on the right side; below 1.0 mm on 0 mm. A
wrong unit (pixels for mm: x3.6), a wrong direction of the map (the sign) or a wrong pose
composition (the template's midline read as far off) fails it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionreg.deformable.register import load_model
from diffusionreg.midline.config import MidlineConfig
from diffusionreg.midline.heads import pose_template
from diffusionreg.midline.synthetic import Acquisition, NormalHead, draw_mass_effect, synth_case

REPO = Path(__file__).resolve().parents[1]
#: Velocity-refinement iterations of the test (the model's ``fast`` count; its default is 30).
REFINE_ITERATIONS = 15
#: A small case grid: 128^2 pixels of 1.8 mm, 2.5 mm slices.
CASE = Acquisition(pixel_mm=1.8, size=128, slice_mm=2.5, noise_hu=0.0)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_midline", REPO / "bench" / "midline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting(shared_data: Path):
    cfg = MidlineConfig()
    template = pose_template(shared_data / "headct")
    head = NormalHead("template", torch.from_numpy(template.array), template.affine, np.eye(4))
    return cfg, template, head, load_model("brain-mri")


@pytest.mark.slow  # two registrations with the shipped network and 15 refinement iterations (~1 CPU-minute)
@pytest.mark.parametrize(("peak_mm", "side"), [(0.0, 1), (10.0, -1)])
def test_peer_reads_a_known_shift_of_the_template(bench, setting, peak_mm: float, side: int) -> None:
    cfg, template, head, deformable = setting
    gen = torch.Generator().manual_seed(0)
    effect = draw_mass_effect(cfg.synth, cfg.frame, gen, peak_mm=peak_mm)
    centre = effect.lesion_centre_mm
    if effect.side != side:  # the lesion on the side the midline moves away from
        centre = (2 * effect.midline_x_mm - centre[0], centre[1], centre[2])
    effect = dataclasses.replace(effect, side=side, lesion_centre_mm=centre)
    case, truth = synth_case(head, effect, cfg.frame, CASE, gen)
    reading = bench.template_midline_shift(case, template, np.eye(4), cfg, deformable, refine_iterations=REFINE_ITERATIONS)
    assert len(reading["slices"]) >= 8  # the read-out found the template's midline on most levels
    for part in (reading, reading["falx_line"]):  # relative to the pose, and to the moved falx line
        if peak_mm == 0.0:
            assert part["case_mls_mm"] < 1.0
        else:
            assert abs(part["case_mls_mm"] - truth["case_mls_mm"]) < 2.0
            assert part["side"] == truth["side"] == "right"
