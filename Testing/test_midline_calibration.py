"""A measured CT is calibrated as the training heads were (``inference.brain_median_hu``).

Scanners differ by tens of HU, and the cadaver of the data is stored ~20 HU brighter than the
template; the networks learnt "normal" at the template's calibration, and an uncalibrated cadaver
read 5.9 mm of shift against 2.9 mm calibrated (bench/results/midline.md). Checked with a tiny model
whose deformation network is random (so its field depends on the intensities): with the calibration
a phantom CT and the same CT 20 HU brighter give the same field and reading, and the report states
the shift (as a note when it is tens of HU); without it they do not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_midline_cli import PHANTOM_CENTRE, tiny_midline_config

from diffusionreg.image import centred_grid
from diffusionreg.midline.heads import brain_median_hu, calibrate_soft_tissue
from diffusionreg.midline.measure import CALIBRATION_NOTE_HU, measure_midline
from diffusionreg.midline.network import MidlineModel
from diffusionreg.midline.phantom import phantom_head

TARGET_HU = 32.0


def _model(calibrate: bool) -> MidlineModel:
    cfg = tiny_midline_config()
    cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, brain_median_hu=TARGET_HU if calibrate else None))
    torch.manual_seed(3)
    template = phantom_head(centred_grid((60, 76, 66), 3.0, PHANTOM_CENTRE))
    model = MidlineModel(cfg, template.shape)
    model.set_template(torch.from_numpy(template.array), template.affine)
    with torch.no_grad():
        for parameter in model.deform.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def cts():
    ct = phantom_head(centred_grid((80, 100, 70), 2.0, (2.0, 15.0, 10.0)))
    return ct, ct.with_array(ct.array + np.float32(20.0))


def test_calibrate_soft_tissue_moves_the_median_to_the_target(cts) -> None:
    ct, brighter = cts
    calibrated, shift = calibrate_soft_tissue(brighter, TARGET_HU)
    assert shift == pytest.approx(TARGET_HU - brain_median_hu(ct.array) - 20.0, abs=1e-3)
    assert brain_median_hu(calibrated.array) == pytest.approx(TARGET_HU, abs=0.5)
    assert np.allclose(calibrated.array, calibrate_soft_tissue(ct, TARGET_HU)[0].array, atol=1e-3)


def test_a_brighter_copy_measures_the_same_only_when_calibrated(cts) -> None:
    ct, brighter = cts
    model = _model(True)
    a, b = measure_midline(ct, model), measure_midline(brighter, model)
    assert b.to_dict()["soft_tissue_shift_hu"] == pytest.approx(a.soft_tissue_shift_hu - 20.0, abs=1e-3)
    # a shift of a few HU is the normal spread and goes unsaid; 20 HU more is a note in the report
    assert abs(a.soft_tissue_shift_hu) < CALIBRATION_NOTE_HU and a.notes() == []
    (note,) = b.to_dict()["notes"]
    assert f"shifted by {b.soft_tissue_shift_hu:+.0f} HU to the soft-tissue calibration" in note
    fields_a, fields_b = (np.stack([u for _, u in r.field_slices]) for r in (a, b))
    assert np.abs(fields_a).max() > 0.5  # a real, intensity-dependent field
    assert np.allclose(fields_a, fields_b, atol=1e-3)
    assert b.case_mls_mm == pytest.approx(a.case_mls_mm, abs=1e-2)
    plain = _model(False)
    raw_a, raw_b = (np.stack([u for _, u in measure_midline(c, plain).field_slices]) for c in (ct, brighter))
    assert np.abs(raw_a - raw_b).max() > 0.05
