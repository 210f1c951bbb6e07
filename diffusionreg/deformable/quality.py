"""Named speed/accuracy presets of a deformable model (``--quality fast|default|best``).

``default`` is the model's registration settings (``DeformableConfig.inference``) as they stand;
``fast`` and ``best`` are stored beside them in the model's ``config.json`` as the settings they
replace (applied by ``DeformableInference.at_quality``). Kept free of torch so that the command
line can list the choices without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

QUALITIES = ("fast", "default", "best")  # --quality; "default" is the inference settings themselves


@dataclass
class QualityPreset:
    """A named speed/accuracy trade-off: the settings it replaces in :class:`DeformableInference`."""

    name: str  # "fast" or "best" ("default" is the inference settings as they stand)
    io_steps: int
    refine_iterations: int
    refine_coarse_iterations: int  # of refine_iterations, those with the loss on the coarse grid
    refine_upsample: float
