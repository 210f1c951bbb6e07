"""Words the backend and the Slicer side share, defined once (standard library only).

Importable as ``diffusionreg.vocabulary`` and by file path (the Slicer side reads it before the
backend's dependencies are installed), so it imports nothing but the standard library.

- Modalities: the image types a model may be trained for. The affine network gives each listed
  modality its own class; ``any`` is class 0, the modality-agnostic class.
- Initialisations: how the affine network grids are pre-aligned (``--initialize``).
- Devices: the names ``--device`` accepts.
- Exit codes of the command line.
- Tasks: what a registry entry registers.
"""

from __future__ import annotations

import re

# --- modalities ------------------------------------------------------------------------------
#: Modality-agnostic: class 0 of a class-conditional model, and "any model" when picking one.
ANY_MODALITY = "any"
#: Every modality a model may declare, in the order the Slicer panel lists them.
MODALITIES = ("mri", "ct", "oct", "octa", "venous", "lung-vessels", ANY_MODALITY)
#: What the Slicer panel shows for each modality.
MODALITY_LABELS = {
    "mri": "MRI",
    "ct": "CT",
    "oct": "OCT",
    "octa": "OCTA",
    "venous": "Venous MRI",
    "lung-vessels": "Lung vessels (binary CT vessel maps)",
    ANY_MODALITY: "Any",
}

# --- affine initialisation ---------------------------------------------------------------------
#: intensity centroids, image centres, or both grids on the fixed centre.
INITIALIZATIONS = ("moments", "center", "none")

# --- devices ---------------------------------------------------------------------------------
#: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DEVICE_HELP = "auto, cpu, cuda or cuda:N"

# --- exit codes ------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILURE = 1  # anything unexpected (an internal error)
EXIT_BAD_INPUT = 2  # one line on stderr names the problem; nothing written
EXIT_CANCELLED = 130  # Ctrl-C or SIGTERM (the Slicer runner's Cancel)

# --- registry --------------------------------------------------------------------------------
TASKS = ("affine", "deformable", "midline", "synth")
