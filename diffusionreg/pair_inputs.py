"""What a registration command reads before registering: the pair, its report labels, a start.

Shared by ``diffusionreg affine`` and ``diffusionreg deformable`` (and so by ``diffusionreg
batch``, which reads a case's inputs ahead on a worker thread with the same function).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command-line parser imports this module: no numpy-heavy imports at its top
    from diffusionreg.image import Image


@dataclass
class PairInputs:
    """The fixed and moving images, the report labels (None without label maps) and the initial
    transform (fixed -> moving; None when the command has none or it is not given)."""

    fixed: Image
    moving: Image
    labels: object  # diffusionreg.reporting.ReportLabels | None
    initial: object = None  # diffusionreg.transforms.Transform | None


def read_pair_inputs(args: argparse.Namespace, stage=None) -> PairInputs:
    """Read ``--fixed``, ``--moving``, the report labels and, for a command that has the option,
    ``--initial-transform``. ``stage`` (a progress stage) advances once per item."""
    from diffusionreg.image import read_image
    from diffusionreg.reporting import read_report_labels
    from diffusionreg.transforms import read_transform

    def done(message: str) -> None:
        if stage is not None:
            stage.update(message=message)

    fixed = read_image(args.fixed, what="fixed image")
    done("fixed")
    moving = read_image(args.moving, what="moving image")
    done("moving")
    labels = read_report_labels(args)
    done("labels")
    inputs = PairInputs(fixed, moving, labels)
    if hasattr(args, "initial_transform"):
        inputs.initial = read_transform(args.initial_transform) if args.initial_transform else None
        done("initial transform")
    return inputs
