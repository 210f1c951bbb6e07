"""The absorbing-diffusion transformer over token grids and its weighted-ELBO loss (spec 1.5).

Token grids are flattened in raster order of the VQ-AE's latent grid (``(B, N)`` code ids in
``0..K-1``); the absorbing state is one extra id, ``mask_id = K``. The network is a bidirectional
transformer encoder that, as in the reference, is not told the diffusion time: the number of
mask tokens in its input carries that information.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusionreg.synth.config import PriorConfig

INIT_STD = 0.02  # N(0, 0.02) for the embeddings and the head (spec 1.5, as samb-t)


class AbsorbingTransformer(nn.Module):
    """Predicts the original code at every position of a partly masked token grid.

    ``forward(tokens (B, N) long in 0..num_codes) -> logits (B, N, num_codes)`` (float, unnormalised).
    Token embedding (num_codes + 1) x width with the mask id ``num_codes``, a learned absolute
    position embedding N x width (added), ``prior.depth`` torch encoder layers, final LayerNorm
    and a bias-free linear head.
    """

    def __init__(self, prior: PriorConfig, num_codes: int, num_tokens: int) -> None:
        super().__init__()
        if num_codes < 1 or num_tokens < 1:
            raise ValueError(f"AbsorbingTransformer needs num_codes >= 1 and num_tokens >= 1 (got {num_codes}, {num_tokens})")
        self.num_codes = num_codes
        self.num_tokens = num_tokens
        self.token_embedding = nn.Embedding(num_codes + 1, prior.width)
        self.position_embedding = nn.Parameter(torch.empty(1, num_tokens, prior.width))
        layer = nn.TransformerEncoderLayer(
            prior.width,
            prior.heads,
            prior.ffn,
            prior.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=prior.norm_first,
        )
        # PyTorch applies the layer's dropout to the attention weights too. On the CPU that (N x N per
        # head) dropout costs ten times the rest of a training step, and samb-t's transformer uses none:
        # dropout stays on the residual and feed-forward paths only.
        layer.self_attn.dropout = prior.attention_dropout
        # Nested tensors only help with padding masks, which a fixed grid never has.
        self.encoder = nn.TransformerEncoder(layer, prior.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(prior.width)
        self.head = nn.Linear(prior.width, num_codes, bias=False)
        for weight in (self.token_embedding.weight, self.position_embedding, self.head.weight):
            nn.init.normal_(weight, mean=0.0, std=INIT_STD)

    @property
    def mask_id(self) -> int:
        """The absorbing [MASK] id: one past the last code."""
        return self.num_codes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"AbsorbingTransformer expects tokens of shape (B, {self.num_tokens}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.position_embedding
        return self.head(self.norm(self.encoder(x)))


def weighted_elbo_loss(
    model: nn.Module, tokens: torch.Tensor, generator: torch.Generator, diffusion_steps: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reweighted ELBO of spec 1.5 for clean token grids ``tokens`` (B, N), in bits per token.

    Per sample, t ~ U{1..T} (T = ``diffusion_steps``) and each token is masked independently with
    probability t/T; the loss is the cross-entropy at masked positions summed per sample, weighted
    by (1 - t/T), divided by ln 2 * N, averaged over the batch. Randomness is drawn from the CPU
    ``generator`` in this order: ``randint(1, T + 1, (B,))``, then ``rand(B, N)`` (masked where
    ``rand < t/T``), so a seed fixes the corruption whatever device the model runs on.

    ``model`` is an :class:`AbsorbingTransformer` or the DistributedDataParallel wrapper the
    training engine puts around it; ``tokens`` may live on any device (moved to the model's).

    Returns the scalar loss and float stats: ``bits_per_token`` (mean cross-entropy in bits over
    the masked positions, 0 if none) and ``masked_fraction``.
    """
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
    # DDP exposes the wrapped network as .module; its forward must still be the one called (gradient sync).
    mask_id = getattr(model, "module", model).mask_id
    tokens = tokens.to(next(model.parameters()).device)
    batch, count = tokens.shape
    t = torch.randint(1, diffusion_steps + 1, (batch,), generator=generator)
    tau = t.to(torch.float32) / diffusion_steps
    masked = torch.rand((batch, count), generator=generator) < tau[:, None]
    tau, masked = tau.to(tokens.device), masked.to(tokens.device)
    corrupted = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    logits = model(corrupted)
    # Float32 cross-entropy even under autocast: a sum over thousands of positions.
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # (B, N) nats
    # Multiplying (not indexing) keeps the graph connected when nothing is masked: then the loss is an exact 0.
    masked_ce = (ce * masked).sum(dim=1)
    loss = ((1.0 - tau) * masked_ce / (math.log(2.0) * count)).mean()
    n_masked = int(masked.sum())
    stats = {
        "bits_per_token": float(masked_ce.detach().sum()) / (math.log(2.0) * n_masked) if n_masked else 0.0,
        "masked_fraction": n_masked / masked.numel(),
    }
    return loss, stats
