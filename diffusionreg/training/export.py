"""Exported weights (safetensors + config.json) and the best model's card stub and registry entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from diffusionreg.io_atomic import atomic_output
from diffusionreg.models import register_entry
from diffusionreg.registry import sha256_file

BEST_FOLDER = "best"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "MODEL_CARD.md"


def export_weights(model: nn.Module, config_json: str, out_dir: Path, name: str = "model", metadata: dict | None = None) -> Path:
    """Write ``out_dir/<name>.safetensors`` (float32, CPU) and ``out_dir/config.json``, each atomically.

    ``metadata`` (e.g. task, method, step) goes into the safetensors header as strings.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    with atomic_output(out_dir / CONFIG_NAME) as tmp:
        tmp.write_text(config_json, encoding="utf-8")
    return path


@dataclass(frozen=True)
class CardFacts:
    """What the model card stub records about a best model."""

    name: str  # registry name
    task: str  # registry task (affine, deformable, ...)
    modality: str
    command: str  # the training command line
    data: list[str]  # training inputs as given
    val_data: list[str]  # validation inputs as given (empty: none / a training subset)
    seed: int
    step: int  # step of this (best) model
    total_steps: int
    metrics: dict  # validation metrics at ``step``
    modalities: tuple[str, ...] = ()  # every modality the model serves, when several


def card_stub(facts: CardFacts, sha256: str) -> str:
    """Markdown stub: the facts a trainer cannot forget; the shipper adds use, limits and licence."""
    metrics = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in facts.metrics.items())
    return (
        f"# {facts.name} ({facts.task}, {', '.join(facts.modalities) or facts.modality}) -- model card stub\n\n"
        "Written by the training engine for the best validation model. Before shipping, add the intended\n"
        "use, the limits, the data licences and the benchmark results.\n\n"
        f"- Command: `{facts.command}`\n"
        f"- Training data: {', '.join(facts.data) or '(none given)'}\n"
        f"- Validation data: {', '.join(facts.val_data) or '(a training subset)'}\n"
        f"- Seed: {facts.seed}\n"
        f"- Steps: best at step {facts.step} of {facts.total_steps}\n"
        f"- Weights: `{WEIGHTS_NAME}`, sha256 `{sha256}`; configuration: `{CONFIG_NAME}`\n\n"
        "## Validation metrics at that step\n\n| metric | value |\n| --- | --- |\n"
        f"{metrics}\n"
    )


def export_best(
    model: nn.Module, config_json: str, out_dir: Path, registry: Path, facts: CardFacts, metadata: dict | None = None
) -> Path:
    """Write ``out_dir/best/`` (weights, config, card stub) and enter it in ``registry`` (Models.json)
    under ``(facts.name, facts.task)`` with its sha256; paths in the entry are relative to the
    registry's folder. Returns the weights path."""
    best = Path(out_dir) / BEST_FOLDER
    weights = export_weights(model, config_json, best, Path(WEIGHTS_NAME).stem, metadata)
    sha256 = sha256_file(weights)
    with atomic_output(best / CARD_NAME) as tmp:
        tmp.write_text(card_stub(facts, sha256), encoding="utf-8")
    register_entry(
        facts.name,
        facts.task,
        facts.modality,
        weights.resolve(),
        (best / CONFIG_NAME).resolve(),
        (best / CARD_NAME).resolve(),
        Path(registry).resolve(),
        facts.modalities,
    )
    return weights
