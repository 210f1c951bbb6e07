"""Choosing the torch device from ``--device auto|cpu|cuda[:N]``."""

from __future__ import annotations

from diffusionreg.errors import InputError, ParameterError
from diffusionreg.vocabulary import DEVICE_HELP, DEVICE_PATTERN


def check_device_name(name: str) -> str:
    """Validate a device name without importing torch (argparse type)."""
    if not DEVICE_PATTERN.match(name):
        raise InputError(f"unknown device {name!r}; use {DEVICE_HELP}")
    return name


def resolve_device(name: str = "auto"):
    """Return a ``torch.device``: ``auto`` picks the first CUDA GPU when there is one.

    A device this torch build or machine lacks (no CUDA, a GPU index past the last, no MPS)
    is bad input (InputError), not a failure deep inside torch.
    """
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{name}: CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ParameterError("device", f"{name}: this machine has {count} CUDA device(s)")
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ParameterError("device", f"{name}: this torch build or machine has no MPS; use cpu")
    return device
