"""``diffusionreg batch``: a cohort of registration, midline-shift and evaluation cases from one CSV.

- :mod:`.jobs` reads the CSV and checks every row with the single command's own parser before
  anything runs;
- :mod:`.tasks` names, per task, the steps of the single command the batch calls (check, read,
  load the model, run with a loaded model);
- :mod:`.runner` streams one process's cases through one loaded model per (task, model), inputs
  read ahead on a worker thread;
- :mod:`.results` keeps one JSON line per finished case, verifies finished cases for ``--resume``,
  merges the ranks' lines and prints the summary;
- :mod:`.cohort_progress` is rank 0's progress over the whole cohort;
- :mod:`.command` is the command line and the ``torchrun`` plumbing.
"""
