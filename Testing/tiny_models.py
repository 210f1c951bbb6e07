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
