"""Load a registered (or given) midline model: sha256-verified safetensors + its config."""

from __future__ import annotations

from diffusionreg import models

from .config import MidlineConfig
from .network import MidlineModel

TASK = "midline"
MODALITY = "ct"


def load_midline_model(name_or_path=None) -> tuple[MidlineModel, str]:
    """The model and its name (None: the first registered midline model, e.g. head-ct-mls)."""
    entry = models.resolve(name_or_path, TASK, MODALITY)
    state = models.load_state_dict(entry)
    cfg = MidlineConfig.from_dict(models.load_config_json(entry))
    return MidlineModel.from_state_dict(cfg, state), entry.name
