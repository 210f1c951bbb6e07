"""Spatial-diffusion affine registration (issue 3).

Public API::

    from diffusionreg.affine import load_model, register_affine
    model = load_model("brain-mri")            # or a path; None = default for the modality
    result = register_affine(fixed, moving, model, modality="mri", steps=None,
                             bidirectional=False, initialize="moments")
    result.transform                           # AffineTransform, fixed LPS -> moving LPS (ITK)

Modules: config (AffineConfig, presets compact/full), schedule, network (AffineDiffusionNet),
gabor, sampling (one-jump forward process), artifacts, preprocess (network grids),
reverse (reverse process, bidirectional), training, register, commands (CLI).
"""

from .config import AffineConfig, get_config

# The torch-based names load on first use: the command line imports this package to build its
# parser, and ``diffusionreg --help`` should not wait for torch.
_LAZY = {"AffineResult", "build_model", "load_model", "register_affine"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import register

        return getattr(register, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AffineConfig", "get_config", "AffineResult", "build_model", "load_model", "register_affine"]
