"""The midline trainings as engine adapters (tiny networks, two steps each): the diffusion stage
exports its best weights, the deformation stage trains on them and exports the whole model that
``diffusionreg midline`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusionreg.midline.model_loading import load_midline_model
from diffusionreg.midline.training import MidlineTrainOptions, train
from diffusionreg.training.options import RunOptions


@pytest.fixture(scope="module")
def tiny_config():
    import dataclasses

    from test_midline_cli import tiny_midline_config

    cfg = tiny_midline_config()
    return dataclasses.replace(
        cfg,
        diffusion=dataclasses.replace(cfg.diffusion, batch_size=2),
        deformation=dataclasses.replace(cfg.deformation, batch_size=2, midline_points=3),
    )


def test_stages_on_the_engine(tmp_path: Path, shared_data: Path, tiny_config) -> None:
    template_dir = shared_data / "headct"
    weights = {}
    for stage in ("diffusion-normal", "diffusion-all"):
        out = tmp_path / stage
        summary = train(
            MidlineTrainOptions(stage=stage, template_dir=template_dir, config=tiny_config),
            RunOptions(output=out, steps=2, val_every=1, threads=1),
        )
        assert summary["step"] == 2 and summary["val_loss"] > 0
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        assert history[0]["step"] == 1
        weights[stage] = out / "best" / "model.safetensors"
        assert weights[stage].exists()
    out = tmp_path / "deformation"
    summary = train(
        MidlineTrainOptions(
            stage="deformation",
            template_dir=template_dir,
            config=tiny_config,
            eps_normal=weights["diffusion-normal"],
            eps_all=weights["diffusion-all"],
        ),
        RunOptions(output=out, steps=2, val_every=2, threads=1),
    )
    assert summary["step"] == 2 and summary["slice_mae_mm"] >= 0
    model, name = load_midline_model(out / "best")
    assert name == "best"
    # the exported bundle carries the trained diffusion weights unchanged and the pose template
    from safetensors.torch import load_file

    trained = load_file(str(weights["diffusion-normal"]))
    for key, value in trained.items():
        assert torch.equal(model.eps_normal.state_dict()[key], value)
    assert model.template_hu.shape == (91, 109, 91)
    # measurements calibrate a CT's soft tissue as the training heads were (to the template head's)
    from diffusionreg.midline.heads import brain_median_hu, template_head

    assert model.cfg.inference.brain_median_hu == pytest.approx(brain_median_hu(template_head(template_dir).volume.numpy()))
    entry = json.loads((out / "Models.json").read_text())["models"][0]
    assert entry["task"] == "midline" and entry["modality"] == "ct"
