"""Shared project modules used by the affine package (single import point)."""
from __future__ import annotations

from diffusionreg.errors import InputError

__all__ = ["InputError"]
