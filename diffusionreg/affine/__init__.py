"""Spatial-diffusion affine registration (issue 3).

Public API:
    AffineConfig, get_config           -- configuration (presets 'compact', 'full')
    AffineDiffusionNet                 -- the network
    register_affine(fixed, moving, ...)-- world-space affine registration -> AffineTransform
"""
from .config import AffineConfig, get_config

__all__ = ["AffineConfig", "get_config"]
