"""Sampling token grids from the absorbing-diffusion transformer (spec 1.6).

Start from an all-[MASK] grid. At step k = 0..steps-1, every still-masked position is selected
with probability 1/(steps - k), so the last step selects all that remain and each position is
revealed at a uniformly random step. The transformer sees the current grid; the selected
positions receive a categorical draw from softmax(logits / temperature). A revealed token is
never masked again.

Unlike the reference (batch 2, 3,328 positions hard-wired) any count, batch size and grid size
work. All randomness comes from one CPU ``torch.Generator`` and the grid state stays on the CPU,
so a seed fixes the random draws on any device (the network's arithmetic may still differ
slightly between devices).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusionreg.errors import CancelledError
from diffusionreg.synth.prior import AbsorbingTransformer


def sample_tokens(
    model: AbsorbingTransformer,
    count: int,
    steps: int,
    temperature: float,
    generator: torch.Generator,
    batch_size: int = 2,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """``count`` token grids, a CPU LongTensor (count, N) of codes in 0..num_codes-1.

    ``generator`` must be a CPU generator. Samples are made ``batch_size`` at a time;
    ``on_step(done, total)`` reports after every step (total = batches x steps);
    ``should_stop()`` is asked before every step and, if true, raises
    :class:`~diffusionreg.errors.CancelledError` (the exception a cancel signal raises).
    The model is run in eval mode without gradients and its training flag is restored after.
    """
    if count < 0 or steps < 1 or batch_size < 1:
        raise ValueError(f"sample_tokens needs count >= 0, steps >= 1, batch_size >= 1 (got {count}, {steps}, {batch_size})")
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    if generator.device.type != "cpu":
        raise ValueError("sample_tokens draws its randomness on the CPU: pass a CPU torch.Generator")
    device = next(model.parameters()).device
    batches = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    total = len(batches) * steps
    done = 0
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in batches:
                tokens = torch.full((size, model.num_tokens), model.mask_id, dtype=torch.long)
                for k in range(steps):
                    if should_stop is not None and should_stop():
                        raise CancelledError("cancelled")
                    still_masked = tokens == model.mask_id
                    # rand in [0, 1) < 1 at the last step: everything left is selected.
                    selected = still_masked & (torch.rand(tokens.shape, generator=generator) < 1.0 / (steps - k))
                    # Drawing only where the draw is kept has the same distribution as drawing
                    # everywhere and discarding; a step that selects nothing needs no network pass.
                    if selected.any():
                        logits = model(tokens.to(device))[selected.to(device)]  # (selected, num_codes)
                        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
                        tokens[selected] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    done += 1
                    if on_step is not None:
                        on_step(done, total)
                results.append(tokens)
    finally:
        model.train(was_training)
    if not results:
        return torch.empty((0, model.num_tokens), dtype=torch.long)
    return torch.cat(results)
