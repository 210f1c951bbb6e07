"""Slicer-side helpers of the DiffusionReg extension, shared by its modules.

Every submodule here except :mod:`install` imports only the standard library, numpy, ``vtk``
and MRML classes (``from slicer import vtkMRML...``): no ``slicer.util``, no ``qt``. That keeps
them importable outside the Slicer application (the MRML test tier runs them against the
``slicer-core`` wheel), and it keeps the code the modules run the code the tests check.

- :mod:`paths`: where the backend package, its resources and this module's resources are
  (the same code works from a source checkout and from an installed extension).
- :mod:`progress`: the backend's JSON progress lines, and one weighted progress over all stages
  with elapsed and remaining time.
- :mod:`command`: command lines and environment for ``PythonSlicer -m diffusionreg ...``.
- :mod:`process`: a background process runner with progress, log and cancel (kills the tree).
- :mod:`job`: one backend run as data (options dataclass, prepared job, runner with an
  injectable process factory, one place that decides success/failure/cancel).
- :mod:`mrml_io`: volumes and transforms between MRML nodes and files, RAS <-> LPS, and
  placing a registration result ("register as displayed").
- :mod:`results`: result import: forward/inverse displacement fields, scalar maps with a colour
  table, volumes in a subject-hierarchy folder, markups (``.mrk.json``), tables (CSV).
- :mod:`device`: the torch/CUDA probe that runs in a subprocess.
- :mod:`models`: the model registry (``Resources/Models.json``), imports and checksums.
- :mod:`model_choice`: which modalities a panel offers (installed models only) and which model runs.
- :mod:`install`: first-use dependency installation (pure planning + Slicer-side actions).
"""
