"""The ``make bench`` suite: neuralpde against its peers on the problems it was built for.

Run ``python -m benchmarks.run --help``. One module per case (``heat2d``, ``heat_step_cost``,
``fokker_planck``, ``diffusion``), the shared timer, table and results writer in ``common``.
"""
