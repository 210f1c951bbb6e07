"""One training engine for every network (affine, deformable, and the ones to come).

A training supplies a :class:`~.engine.TrainingTask` -- its network, optimiser, one ``step`` (batch
-> loss) and optionally a learning-rate factor, an EMA and a ``validate`` function -- and calls
:func:`~.engine.run_training` with the run settings (:class:`~.options.RunOptions`). The engine
does the rest: process group, DDP, resume, checkpoint ticks, ``--max-minutes``, validation, the
best-model export into a ``Models.json``, history lines and progress. Modules: ``engine`` (the
loop), ``options`` (run settings and their CLI flags), ``checkpoint`` (atomic resumable state),
``export`` (weights, card stub, registry entry), ``ema``, ``lr`` (schedules) and ``handlers``
(history and progress reporting).
"""
