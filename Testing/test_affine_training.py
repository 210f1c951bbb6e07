"""Training: loss goes down, EMA / LR schedule, checkpoints + resume, 2-process gloo DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusionreg.affine.config import AffineConfig
from diffusionreg.affine.network import AffineDiffusionNet
from diffusionreg.affine.sampling import frobenius_loss
from diffusionreg.affine.schedule import Schedule
from diffusionreg.affine.training import TrainingSet, TrainOptions, load_subject, make_batch, train
from diffusionreg.training.ema import EMA
from diffusionreg.training.lr import warmup_cosine as lr_factor
from diffusionreg.training.options import RunOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def brain(request):
    try:
        root = Path(request.getfixturevalue("shared_data"))
    except pytest.FixtureLookupError:
        root = ROOT.parent / "shared" / "data"
    d = root / "brain"
    if not (d / "vxm_test_scan_T1.nii.gz").exists():
        pytest.skip(f"shared brain data not found under {d}")
    return d


def tiny() -> AffineConfig:
    return AffineConfig(
        name="tiny",
        grid_size=32,
        spacing_mm=7.0,
        widths=(2, 8, 16, 16, 32, 32, 32),
        time_dim=32,
        time_hidden=64,
        trans_std_vox=(0.06, 0.5),
        lr=2e-3,
        warmup_steps=5,
        batch_size=4,
        elastic_std_vox=0.4,
        motion_band=(1, 2),
        motion_shift=(1, 3),
        doubling_shift=3,
        stretch_band=(1, 3),
    )


def test_a_tiny_training_run_lowers_the_loss(brain):
    torch.manual_seed(0)
    cfg = tiny()
    subj = [load_subject(brain / "vxm_test_scan_T1.nii.gz", cfg)]
    assert subj[0].shape == (1, 64, 64, 64)
    sched = Schedule.from_config(cfg)
    x, t, _, target, _ = make_batch(subj, cfg, sched, torch.Generator().manual_seed(1), batch_size=8)
    net = AffineDiffusionNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    with torch.no_grad():
        before = float(frobenius_loss(net(x, t), target))
    for _ in range(40):
        loss = frobenius_loss(net(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(frobenius_loss(net(x, t), target))
    assert after < 0.6 * before, (before, after)


def test_batch_targets_match_the_corruption(brain):
    cfg = tiny()
    subj = [load_subject(brain / "vxm_test_scan_T1.nii.gz", cfg)]
    x, t, cls, target, mat = make_batch(subj, cfg, Schedule.from_config(cfg), torch.Generator().manual_seed(2), batch_size=3)
    assert x.shape == (3, 2, 32, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(torch.linalg.inv(mat)[:, :3], target)
    assert ((t >= 1) & (t <= cfg.timesteps)).all() and (cls == 0).all()


def test_lr_schedule_and_ema():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5, abs=1e-9)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-9)
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, beta=0.995, power=0.75, start=2)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, 1)  # before start: copy
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net, 10)  # decay = 1 - 9^-0.75 = 0.807
    expected = 1.0 * (1 - 9**-0.75) + 3.0 * 9**-0.75
    assert float(ema.module.weight[0, 0]) == pytest.approx(expected, rel=1e-5)


def test_checkpoint_and_resume(brain, tmp_path):
    cfg = tiny()
    out = tmp_path / "run"
    vol = str(brain / "vxm_test_scan_T1.nii.gz")
    opts = TrainOptions(datasets=[TrainingSet([vol])], config=cfg, val_recover=1)
    s1 = train(opts, RunOptions(output=out, steps=6, val_every=0))
    assert s1["step"] == 6
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and {"model", "ema", "optim", "rng", "lr_schedule"} <= set(state)
    assert (out / "model.safetensors").exists() and json.loads((out / "config.json").read_text())["grid_size"] == 32
    s2 = train(opts, RunOptions(output=out, steps=9, resume=True, val_every=0))
    assert s2["step"] == 9
    assert "recovery_mm_mean" in s2
    # the best (validated) EMA weights are registered with their sha256 and load by name
    from diffusionreg import models
    from diffusionreg.affine.register import load_model

    entry = models.resolve("run", "affine", registry_path=out / "Models.json")
    models.verify(entry)
    assert load_model(str(entry.file)).cfg.grid_size == 32  # weights + config.json beside them
    card = (out / "best" / "MODEL_CARD.md").read_text()
    assert "Seed: 42" in card and "recovery_mm_mean" in card and vol in card


@pytest.mark.slow
def test_ddp_two_processes_gloo(brain, tmp_path):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(tiny().to_json())
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "diffusionreg",
        "train",
        "affine",
        "--data",
        str(brain / "vxm_test_scan_T1.nii.gz"),
        "--config",
        str(cfg_path),
        "--steps",
        "4",
        "--val-every",
        "0",
        "--threads",
        "1",
        "--output",
        str(out),
        "--progress",
        "none",
    ]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "world 2" in res.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2


def test_train_affine_prints_json_progress(brain, tmp_path):
    """``diffusionreg train affine --progress json``: progress lines for Slicer's runner."""
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(tiny().to_json())
    cmd = [
        sys.executable,
        "-m",
        "diffusionreg",
        "train",
        "affine",
        "--progress",
        "json",
        "--data",
        str(brain / "vxm_test_scan_T1.nii.gz"),
        "--config",
        str(cfg_path),
        "--steps",
        "2",
        "--val-every",
        "0",
        "--threads",
        "1",
        "--output",
        str(tmp_path / "run"),
    ]
    res = subprocess.run(
        cmd, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    train_lines = [r for r in records if r["stage"] == "train affine"]
    assert train_lines[0]["fraction"] == 0.0 and train_lines[-1]["fraction"] == 1.0
    assert any(r["message"].startswith("step 2/2") for r in train_lines)
