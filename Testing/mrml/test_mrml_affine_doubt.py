"""A doubtful affine result in the SpatialDiffusionReg module (issue 16): the job asks the backend for
its JSON report, and a result the backend calls doubtful is said so in the scripting result
(``doubtful``, ``doubtReason``), in the log and in the panel's result summary (warning colours).

Real backend runs of the shipped brain model on a real slicer-core scene: a brain against noise
(doubtful, as in ``Testing/test_affine_pose_search.py``) and the sample brain pair (sound).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from . import test_mrml_panel_kit as kit
from .conftest import REPO

# The kit tier's fixtures (its Qt stand-ins, and SpatialDiffusionReg.py imported with them).
core, spatial = kit.core, kit.spatial

pytestmark = pytest.mark.mrml

SAMPLE = REPO / "Resources" / "Sample"


class _Label(kit._Widget):
    """The result label, recording its style sheet."""

    def setStyleSheet(self, style):
        self.styleSheet = style


@pytest.fixture
def brain_and_noise(scene, mrml_io, tmp_path):
    pytest.importorskip("torch", reason="the affine command needs torch (installed with the backend)")
    from diffusionreg.image import Image, write_image

    noise = Image(np.random.default_rng(3).random((60, 60, 60)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    write_image(noise, tmp_path / "noise.nii.gz")
    fixed = mrml_io.importVolume(SAMPLE / "sample_fixed.nii.gz", scene, name="brain")
    return fixed, mrml_io.importVolume(tmp_path / "noise.nii.gz", scene, name="noise")


def _widget(spatial):
    """The module widget's result handling, with a stand-in label and log."""
    widget = spatial.SpatialDiffusionRegWidget()
    widget.ui = types.SimpleNamespace(resultLabel=_Label())
    widget.panel = types.SimpleNamespace(logged=[])
    widget.panel.log = widget.panel.logged.append
    widget._parameterNode = None
    return widget


def test_job_asks_for_the_report_the_backend_accepts(scene, affine_job, brain_and_noise):
    from diffusionreg.cli import build_parser

    fixed, moving = brain_and_noise
    files = {"fixed": "f.nrrd", "moving": "m.nrrd", "transform": "t.h5", "report": "r.json"}
    arguments = affine_job.AffineOptions(fixed, moving, device="cpu").asArgList(files)
    assert arguments[arguments.index("--output-json") + 1] == "r.json"
    assert build_parser().parse_args(["affine", *arguments]).output_json.name == "r.json"


def test_brain_against_noise_is_doubtful_in_the_result_the_log_and_the_panel(spatial, affine_job, brain_and_noise):
    fixed, noise = brain_and_noise
    logic = spatial.SpatialDiffusionRegLogic()  # the real backend process

    result = logic.register(fixed, noise, modality="mri", steps=4, device="cpu", showResult=False, timeout=600)

    assert result.doubtful is True and "below" in result.doubtReason, result.report
    assert result.similarity == result.report["similarity_nmi"] < 0.44
    assert result.report["doubt_reason"] == result.doubtReason
    assert result.transformNode is not None, "a doubtful result is still a result: the transform is imported"
    assert [n for n in result.notes if n.startswith("Warning: the result is doubtful: ")]
    widget = _widget(spatial)
    widget.onResult(result)
    label = widget.ui.resultLabel
    assert label.text.startswith("Doubtful result: normalised mutual information") and label.text == result.summary()
    assert label.styleSheet == affine_job.DOUBTFUL_STYLE != affine_job.SOUND_STYLE
    assert any("doubtful" in line for line in widget.panel.logged)


def test_the_sample_pair_is_not_doubtful(spatial, affine_job, scene, mrml_io):
    pytest.importorskip("torch", reason="the affine command needs torch (installed with the backend)")
    fixed = mrml_io.importVolume(SAMPLE / "sample_fixed.nii.gz", scene, name="fixed")
    moving = mrml_io.importVolume(SAMPLE / "sample_moving.nii.gz", scene, name="moving")

    result = spatial.SpatialDiffusionRegLogic().register(fixed, moving, modality="mri", steps=4, device="cpu", timeout=600)

    assert result.doubtful is False and result.doubtReason == "" and result.similarity > 0.44, result.report
    widget = _widget(spatial)
    widget.onResult(result)
    assert widget.ui.resultLabel.text.startswith("Registered in ") and "similarity" in widget.ui.resultLabel.text
    assert widget.ui.resultLabel.styleSheet == affine_job.SOUND_STYLE
    assert not any("doubtful" in line for line in widget.panel.logged)
