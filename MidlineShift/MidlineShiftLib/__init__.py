"""MidlineShift without Qt: the midline measurement job (options, preparation, result import).

``midline_job`` runs in Slicer and in the ``slicer-core`` test tier alike; the module file
``MidlineShift.py`` only adds the panel and the slice-view display.
"""
