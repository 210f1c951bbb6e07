"""The absorbing-diffusion transformer, its weighted-ELBO loss and the sampler (spec 1.5-1.6).

Tiny real networks (width 32, 2 layers, K = 8 codes, N = 24 positions) on the CPU: shapes and
sizes, the loss against a hand computation with the same random draws, the sampler's schedule,
determinism and cancellation, and an end-to-end check that training with the loss and sampling
with the sampler reproduce a single memorised token grid.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusionreg.errors import CancelledError
from diffusionreg.synth.config import PriorConfig, full
from diffusionreg.synth.prior import AbsorbingTransformer, weighted_elbo_loss
from diffusionreg.synth.sampler import sample_tokens

K = 8  # codes
N = 24  # token positions
TINY = PriorConfig(width=32, depth=2, heads=2, ffn=64, dropout=0.0)


def tiny_model(seed: int = 0, prior: PriorConfig = TINY) -> AbsorbingTransformer:
    torch.manual_seed(seed)
    return AbsorbingTransformer(prior, num_codes=K, num_tokens=N)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recording(torch.nn.Module):
    """Wraps a model and keeps a copy of every input grid it is given."""

    def __init__(self, model: AbsorbingTransformer) -> None:
        super().__init__()
        self.model = model
        self.num_tokens, self.mask_id = model.num_tokens, model.mask_id
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tokens.clone())
        return self.model(tokens)


def test_shapes_mask_id_and_bad_input():
    model = tiny_model()
    assert model.mask_id == K
    tokens = torch.randint(0, K + 1, (3, N), generator=seeded(1))
    logits = model(tokens)
    assert logits.shape == (3, N, K) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, 24\)"):
        model(tokens[:, :-1])


def test_full_preset_has_the_reference_size():
    """Spec 1.5 computes 27.99 M parameters for the paper's sizes (pre-LN changes no count)."""
    cfg = full()
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = AbsorbingTransformer(cfg.prior, cfg.vqae.num_embeddings, cfg.num_tokens)
    assert cfg.num_tokens == 3328
    assert sum(p.numel() for p in model.parameters()) == 27_987_456
    assert model.head.bias is None and all(layer.norm_first for layer in model.encoder.layers)


def test_loss_equals_hand_computation():
    model = tiny_model(2)
    tokens = torch.randint(0, K, (5, N), generator=seeded(3))
    T = 4
    loss, stats = weighted_elbo_loss(model, tokens, seeded(7), T)

    # The documented draw order: t per sample, then one uniform per position.
    g = seeded(7)
    t = torch.randint(1, T + 1, (5,), generator=g)
    u = torch.rand((5, N), generator=g)
    expected, nats, n_masked = 0.0, 0.0, 0
    with torch.no_grad():
        for b in range(5):
            tau = t[b].item() / T
            masked = [i for i in range(N) if u[b, i].item() < tau]
            corrupted = tokens[b].clone()
            corrupted[masked] = K
            log_p = torch.log_softmax(model(corrupted[None])[0], dim=-1)
            ce = sum(-log_p[i, tokens[b, i]].item() for i in masked)
            expected += (1 - tau) * ce / (math.log(2) * N) / 5
            nats += ce
            n_masked += len(masked)
    assert 0 < n_masked < 5 * N  # the draw exercises both masked and kept positions
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["masked_fraction"] == pytest.approx(n_masked / (5 * N))
    assert stats["bits_per_token"] == pytest.approx(nats / n_masked / math.log(2), rel=1e-5)


def test_loss_through_the_engines_ddp_wrapper(tmp_path):
    """The training engine wraps the network in DistributedDataParallel (gloo, one rank here)."""
    import torch.distributed as dist

    model = tiny_model(2)
    tokens = torch.randint(0, K, (5, N), generator=seeded(3))
    plain, _ = weighted_elbo_loss(model, tokens, seeded(7), 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped, _ = weighted_elbo_loss(torch.nn.parallel.DistributedDataParallel(model), tokens, seeded(7), 4)
        wrapped.backward()
    finally:
        dist.destroy_process_group()
    assert wrapped.item() == pytest.approx(plain.item(), rel=1e-6)
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_loss_without_masked_tokens_is_zero_and_differentiable():
    model = tiny_model()
    tokens = torch.randint(0, K, (1, N), generator=seeded(0))
    T = 10_000  # t/T is often small: find a seed whose draw (same order as the loss) masks nothing
    for seed in range(1000):
        g = seeded(seed)
        t = torch.randint(1, T + 1, (1,), generator=g)
        if not (torch.rand((1, N), generator=g) < t / T).any():
            break
    loss, stats = weighted_elbo_loss(model, tokens, seeded(seed), T)
    assert stats["masked_fraction"] == 0
    assert loss.item() == 0.0 and stats["bits_per_token"] == 0.0
    loss.backward()  # the graph is intact (zero gradients, no error)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_loss_with_one_step_is_zero():
    """T = 1: t = T masks everything and the (1 - t/T) weight is 0."""
    model = tiny_model()
    loss, stats = weighted_elbo_loss(model, torch.randint(0, K, (2, N), generator=seeded(0)), seeded(0), 1)
    assert loss.item() == 0.0 and stats["masked_fraction"] == 1.0 and stats["bits_per_token"] > 0


def test_samples_valid_deterministic_and_seed_dependent():
    model = tiny_model()
    model.train()
    a = sample_tokens(model, 5, 6, 1.0, seeded(11), batch_size=2)
    b = sample_tokens(model, 5, 6, 1.0, seeded(11), batch_size=2)
    c = sample_tokens(model, 5, 6, 1.0, seeded(12), batch_size=2)
    assert a.shape == (5, N) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < K  # no mask id left, only codes
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert model.training  # the caller's mode is restored
    assert sample_tokens(model, 0, 4, 1.0, seeded(0)).shape == (0, N)


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_every_position_revealed_once_and_never_remasked(steps):
    recording = Recording(tiny_model())
    out = sample_tokens(recording, 3, steps, 0.9, seeded(5), batch_size=3)
    assert not (out == K).any()
    grids = [*recording.inputs, out]
    assert torch.all(grids[0] == K)  # starts all-mask
    for before, after in zip(grids, grids[1:]):
        kept = before != K
        assert torch.equal(after[kept], before[kept])  # revealed tokens never change or re-mask
        assert (after == K).sum() < (before == K).sum()  # each pass reveals something
    if steps == 1:
        assert len(recording.inputs) == 1


def test_reveal_schedule_is_uniform_over_steps():
    """Position i is revealed at step k with probability 1/steps: before step k, N (1 - k/steps) remain."""
    recording = Recording(tiny_model())
    steps = 4
    sample_tokens(recording, 200, steps, 1.0, seeded(3), batch_size=200)
    assert len(recording.inputs) == steps
    remaining = [(grid == K).sum(dim=1).float().mean().item() for grid in recording.inputs]
    assert remaining == pytest.approx([N * (1 - k / steps) for k in range(steps)], abs=0.6)


def test_lower_temperature_lowers_entropy():
    model = tiny_model(4)
    with torch.no_grad():
        model.head.weight.mul_(50)  # spread the logits so temperature has something to act on

    def mean_entropy(temperature: float) -> float:
        samples = sample_tokens(model, 64, 4, temperature, seeded(0), batch_size=64)
        freq = torch.stack([torch.bincount(samples[:, i], minlength=K) for i in range(N)]).float() / 64
        return float(-(freq * torch.log(freq.clamp_min(1e-12))).sum(dim=1).mean())

    cold, warm, hot = mean_entropy(0.2), mean_entropy(1.0), mean_entropy(5.0)
    assert cold < warm < hot
    assert hot > 0.8 * math.log(K)  # close to uniform


def test_progress_and_cancel():
    model = tiny_model()
    model.train()
    reports: list[tuple[int, int]] = []
    sample_tokens(model, 3, 4, 1.0, seeded(0), batch_size=2, on_step=lambda d, t: reports.append((d, t)))
    assert reports == [(d, 8) for d in range(1, 9)]  # 2 batches x 4 steps

    asked, reports = [], []

    def stop_on_third_ask() -> bool:
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(CancelledError):
        sample_tokens(model, 3, 4, 1.0, seeded(0), on_step=lambda d, t: reports.append((d, t)), should_stop=stop_on_third_ask)
    assert reports == [(1, 8), (2, 8)]
    assert model.training  # restored on the way out too


def test_bad_sampler_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(model, 1, 4, 0.0, seeded(0))
    with pytest.raises(ValueError, match="steps"):
        sample_tokens(model, 1, 0, 1.0, seeded(0))


def test_training_then_sampling_reproduces_a_memorised_grid():
    """One grid, a few hundred Adam steps of the weighted ELBO: a cold sample is that grid."""
    model = tiny_model(6)
    target = torch.randint(0, K, (1, N), generator=seeded(9))
    batch = target.expand(16, N)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = seeded(1)
    model.train()
    first = None
    for _ in range(300):
        loss, stats = weighted_elbo_loss(model, batch, generator, 16)
        first = stats["bits_per_token"] if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert first > 2.0 and stats["bits_per_token"] < 0.05  # from ~log2(8) = 3 bits to almost none
    samples = sample_tokens(model, 4, 8, 0.1, seeded(2), batch_size=4)
    assert torch.equal(samples, target.expand(4, N))
