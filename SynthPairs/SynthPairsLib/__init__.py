"""SynthPairs without Qt: the deformable registration job (options, preparation, result import).

``deformable_job`` runs in Slicer and in the ``slicer-core`` test tier alike; the module file
``SynthPairs.py`` only adds the panel and the slice-view display.
"""
