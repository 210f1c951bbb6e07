"""Spatial Diffusion Registration without Qt: the affine job (options, preparation, result import).

``affine_job`` runs in Slicer and in the ``slicer-core`` test tier alike; the module file
``SpatialDiffusionReg.py`` only adds the panel and the slice-view display.
"""
