"""The paired VQ-AE (spec 1.4): one discrete token grid for a (fixed, moving) pair of vessel maps.

MONAI's :class:`~monai.networks.nets.VQVAE` (2 channels in, 4 out, EMA codebook) with:

* the reconstruction loss of the spec -- two independent 2-class cross-entropies (fixed: output
  channels 0-1, moving: 2-3) with class weights (background, vessel), against *soft* targets
  (the frame's box-averaged vessel probabilities);
* dead-code restarts: every ``restart_every`` steps, codes whose EMA usage count fell below
  ``dead_code_usage`` are moved onto random encoder outputs of the current batch. The reference
  has no restarts and uses 72 of its 1,024 codes; restarts keep the codebook in use.

Conventions: volumes ``(B, 2, *frame)`` in [0, 1]; tokens ``(B, *token_grid)`` int64; decoded
probabilities ``(B, 2, *frame)`` = softmax vessel channel of each scan.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.nets import VQVAE
from torch import nn

from .config import VQAEConfig


class PairedVQAE(nn.Module):
    """MONAI VQ-VAE over (fixed, moving) vessel maps with codebook statistics and restarts."""

    def __init__(self, config: VQAEConfig) -> None:
        super().__init__()
        self.config = config
        stages = len(config.channels)
        self.net = VQVAE(
            spatial_dims=3,
            in_channels=2,
            out_channels=4,
            channels=config.channels,
            num_res_layers=config.num_res_layers,
            num_res_channels=config.num_res_channels,
            downsample_parameters=((2, 4, 1, 1),) * stages,
            upsample_parameters=((2, 4, 1, 1, 0),) * stages,
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            commitment_cost=config.commitment_cost,
            decay=config.ema_decay,
        )

    @property
    def quantizer(self) -> nn.Module:
        """MONAI's EMAQuantizer (codebook ``embedding.weight``, ``ema_cluster_size``, ``ema_w``)."""
        return self.net.quantizer.quantizer

    def forward(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (B, 4, *), vq_loss, encodings (B, C, *tokens))`` of a batch of framed pairs."""
        encodings = self.net.encode(volumes)
        quantised, vq_loss = self.net.quantize(encodings)
        return self.net.decode(quantised), vq_loss, encodings

    @torch.no_grad()
    def tokenise(self, volumes: torch.Tensor) -> torch.Tensor:
        """Framed pairs ``(B, 2, *frame)`` -> token indices ``(B, *token_grid)`` (int64)."""
        return self.net.index_quantize(volumes).long()

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices ``(B, *token_grid)`` -> vessel probabilities ``(B, 2, *frame)`` (fixed, moving)."""
        return vessel_probabilities(self.net.decode_samples(tokens))

    @torch.no_grad()
    def restart_dead_codes(self, encodings: torch.Tensor, generator: torch.Generator) -> int:
        """Move codes with EMA usage below ``dead_code_usage`` onto random encoder outputs of this
        batch (the same choice on every rank: rank 0's is broadcast). Returns how many moved."""
        q = self.quantizer
        dead = q.ema_cluster_size < self.config.dead_code_usage
        flat = encodings.detach().permute(0, 2, 3, 4, 1).reshape(-1, encodings.shape[1]).float()
        pick = torch.randint(flat.shape[0], (q.num_embeddings,), generator=generator)
        candidates = flat[pick]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(candidates, 0)
            dist.broadcast(dead, 0)
        count = int(dead.sum())
        if count:
            q.embedding.weight.data[dead] = candidates[dead]
            # EMAQuantizer holds embedding = ema_w / ema_cluster_size: restart both consistently
            q.ema_w.data[dead] = candidates[dead]
            q.ema_cluster_size.data[dead] = 1.0
        return count


def vessel_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, 4, *)`` -> vessel probability of each scan ``(B, 2, *)`` (softmax per pair)."""
    fixed = torch.softmax(logits[:, 0:2], dim=1)[:, 1]
    moving = torch.softmax(logits[:, 2:4], dim=1)[:, 1]
    return torch.stack([fixed, moving], dim=1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: tuple[float, float]) -> torch.Tensor:
    """½ CE_w(fixed) + ½ CE_w(moving) against soft targets ``(B, 2, *)`` in [0, 1] (spec 1.4)."""
    weight = torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)
    losses = []
    for scan in range(2):
        p = target[:, scan]
        soft = torch.stack([1.0 - p, p], dim=1)
        losses.append(F.cross_entropy(logits[:, 2 * scan : 2 * scan + 2], soft, weight=weight))
    return 0.5 * (losses[0] + losses[1])


def soft_dice(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice per scan ``(B, 2)`` between two probability volumes ``(B, 2, *)``."""
    dims = tuple(range(2, probabilities.ndim))
    overlap = (probabilities * target).sum(dims)
    return 2.0 * overlap / (probabilities.sum(dims) + target.sum(dims)).clamp_min(1e-6)


def codebook_usage(tokens: torch.Tensor, num_codes: int) -> dict:
    """Codes in use (count and fraction) and the perplexity ``exp(H)`` of their distribution."""
    counts = torch.bincount(tokens.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1.0)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / num_codes, "perplexity": math.exp(entropy)}
