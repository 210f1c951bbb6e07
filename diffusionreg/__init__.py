"""DiffusionReg backend: diffusion-model registration with exact world geometry.

Pure Python (numpy, torch, SimpleITK, nibabel); never imports slicer, qt, ctk or vtk.
Geometry conventions live in :mod:`diffusionreg.spaces` (the world is LPS mm internally).
"""

__version__ = "0.1.0"
