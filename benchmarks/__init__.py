"""fastcontrast's benchmark suite (installed as ``fastcontrast.benchmarks``).

    fastcontrast bench [--suite NAME] [--device cpu|cuda] [--out DIR] [-- SCRIPT OPTIONS]

Every case is one loss implementation (fastcontrast's backends, plain PyTorch, torch.compile,
the libraries people use) doing forward+backward on the same seeded inputs, in a fresh worker
process: its loss is first checked against fastcontrast's reference (WRONG, not timed, if it
differs), then its peak extra memory and median time are measured; out-of-memory and time-outs
are results. Modules: ``families`` (the losses and their implementations), ``peers`` (loading
the other libraries), ``worker`` (one case, in the child), ``runner`` (the parent: processes,
budgets, progress), ``suites`` (the grids), ``report`` (table, JSON, CSV, markdown), ``plots``
(PNG), ``driver`` (the command). ``core_targets.py`` and the pytest-benchmark suites
(``pytest benchmarks/``) measure the fused core's targets; ``methods_cpc_run.py`` and
``methods_dim_amdim_cmc.py`` the reference methods (benchmarks/results/methods-*).
"""
