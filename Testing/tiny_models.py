"""Tiny random networks for tests of files, geometry, errors and defaults (never accuracy).

One definition of the tiny affine network, so fixtures differ only in what they test (a registry
entry, non-default inference settings) and not in copies of its widths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_affine_config(name: str = "tiny-affine", **overrides: Any):
    """An ``AffineConfig`` of a 16^3 network at 12 mm, 4 diffusion steps (fields overridable)."""
    from diffusionreg.affine.config import AffineConfig

    settings: dict[str, Any] = dict(
        name=name,
        grid_size=16,
        spacing_mm=12.0,
        widths=(2, 4, 4, 8),
        norm_groups=2,
        time_dim=8,
        time_hidden=16,
        timesteps=4,
        zero_init_head=False,
    )
    settings.update(overrides)
    return AffineConfig(**settings)


def write_affine_model(config, folder: Path, seed: int = 0) -> Path:
    """Random weights of ``config`` as ``folder/model.safetensors`` + ``config.json``; returns the weights path."""
    import torch
    from safetensors.torch import save_file

    from diffusionreg.affine.register import build_model

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in build_model(config).net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
    return folder / "model.safetensors"


def tiny_synth_config():
    """A few-second ``SynthConfig``: 16^3 frame at 18 mm, 4^3 tokens, a one-layer prior, 8 sampling steps."""
    from diffusionreg.synth.config import SynthConfig, compact

    data = compact().to_dict()
    data["frame"].update(shape=[16, 16, 16], spacing_mm=18.0, offset_voxels=[0, 0, 0])
    data["vqae"].update(
        channels=[4, 8],
        num_res_channels=[4, 8],
        num_embeddings=16,
        embedding_dim=4,
        crop=[8, 8, 8],
        batch_size=2,
        restart_every=2,
    )
    data["prior"].update(width=16, depth=1, heads=2, ffn=32, batch_size=2, warmup_steps=1, augmentations_per_pair=1)
    data["sampling"].update(steps=8)
    return SynthConfig.from_dict(data)


def write_tiny_generator(root: Path, fixed: Path, moving: Path, config=None) -> Path:
    """Train a tiny pair generator on one real pair with the real commands (``diffusionreg train
    synth``, both stages, 4 steps each) under ``root``; returns the generator's model folder.

    ``config``: a ``SynthConfig`` (default :func:`tiny_synth_config`). For tests of files,
    geometry and the commands, never of what the generator draws.
    """
    from conftest import run_cli

    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.json"
    path.write_text((config or tiny_synth_config()).to_json())
    pair = f"{fixed},{moving}"
    common = ["--config", str(path), "--threads", "1", "--progress", "none", "--val-every", "4"]
    run_cli(
        "train", "synth", "--stage", "vqae", "--pairs", pair, "--steps", "4", "--output", str(root / "vqae"), *common, check=True
    )
    run_cli(
        "train", "synth", "--stage", "prior", "--pairs", pair, "--vqae", str(root / "vqae"), "--steps", "4",
        "--output", str(root / "prior"), *common, check=True,
    )  # fmt: skip
    return root / "prior" / "best"
