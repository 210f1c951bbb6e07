"""Choosing the torch device from ``--device auto|cpu|cuda[:N]``."""

from __future__ import annotations

from diffusionreg.errors import InputError
from diffusionreg.vocabulary import DEVICE_HELP, DEVICE_PATTERN


def check_device_name(name: str) -> str:
    """Validate a device name without importing torch (argparse type)."""
    if not DEVICE_PATTERN.match(name):
        raise InputError(f"unknown device {name!r}; use {DEVICE_HELP}")
    return name


def resolve_device(name: str = "auto"):
    """Return a ``torch.device``: ``auto`` picks the first CUDA GPU when there is one."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)
