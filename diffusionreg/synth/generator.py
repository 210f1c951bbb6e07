"""The trained generator as one module: the paired VQ-AE, the prior, and the training token grids.

Weights are one ``model.safetensors`` (``vqae.*``, ``prior.*``, ``training_tokens``) with its
``config.json`` (a :class:`~.config.SynthConfig` of stage ``generator``); a VQ-AE run alone has
stage ``vqae``. Files are read after their sha256 is checked when a registry entry names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffusionreg.errors import InputError

from .config import SynthConfig
from .vqae import PairedVQAE


class PairGenerator(nn.Module):
    """VQ-AE + absorbing-diffusion prior; ``training_tokens`` (P, N) are the real pairs' grids."""

    def __init__(self, config: SynthConfig, training_tokens: torch.Tensor | None = None) -> None:
        super().__init__()
        from .prior import AbsorbingTransformer

        self.config = config
        self.vqae = PairedVQAE(config.vqae)
        self.prior = AbsorbingTransformer(config.prior, config.vqae.num_embeddings, config.num_tokens)
        tokens = training_tokens if training_tokens is not None else torch.zeros(0, config.num_tokens, dtype=torch.long)
        self.register_buffer("training_tokens", tokens.long().clone())

    def train(self, mode: bool = True) -> PairGenerator:
        super().train(mode)
        self.vqae.eval()  # frozen tokeniser: its EMA codebook must not move while the prior trains
        return self


def read_weights(path: Path, stage: str) -> tuple[dict[str, torch.Tensor], SynthConfig]:
    """``(state_dict, config)`` of a run folder (``best/`` preferred), a model folder or a
    ``model.safetensors`` beside its ``config.json``; refuses a different stage."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and (path / "best" / "model.safetensors").is_file():
        path = path / "best"
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.parent / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise InputError(f"no trained synth {stage} at {path} (need model.safetensors and config.json)")
    cfg = SynthConfig.from_dict(json.loads(config_path.read_text()))
    if cfg.stage != stage:
        raise InputError(f"{weights} is a synth {cfg.stage}, not a {stage}")
    return load_file(str(weights)), cfg
