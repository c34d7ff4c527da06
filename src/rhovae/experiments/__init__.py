"""Grids of runs and their report: what `rhovae compare` does.

An experiment (a TOML file, or a preset shipped in ``rhovae/presets``) names a grid of run settings and
the fixed settings every run shares::

    name = "quick"
    [grid]                      # every combination is one run; any RunConfig field may vary
    model = ["mlp"]
    dataset = ["auto"]          # auto: fashion-mnist when installed, else mnist-5k (said in the report)
    posterior = ["diagonal", "ar1"]
    seed = [0, 1, 2]
    [run]                       # fixed settings of every run
    epochs = 5
    [evaluate]
    iwae_k = 100
    iwae_limit = 0              # test examples for the IWAE bound (0: all)
    baseline = "diagonal"       # paired differences are posterior minus this, seed by seed

Each run has its own folder under ``OUT/runs``; a run whose ``evaluation.json`` exists for the same
config is not redone, a run with a ``last.pt`` resumes, so an interrupted grid continues where it
stopped. The report (``report.md``, ``report.json``, ``runs.csv`` and pictures) is written from the run
folders, so it can be rebuilt at any time.

Modules, each importing only those listed before it: ``grid`` (:class:`Experiment`,
:func:`load_experiment`, the presets, run ids), ``records`` (a run's ``evaluation.json`` and whether it
is of a grid point's settings), ``stats`` (means, sds, paired differences), ``report`` (the report and
its terminal summary), ``ray`` (runs as Ray tasks; it is given the function to run) and ``run``
(:func:`run_one`, :func:`compare`: runs in this process, a local process pool or Ray).
"""

from rhovae.experiments.grid import MAX_GRID_POINTS, PRESETS, Experiment, file_label, load_experiment
from rhovae.experiments.report import METRIC_NAMES, METRICS, OPTIONAL_METRICS, print_summary, write_report
from rhovae.experiments.run import IN_USE, compare, die_with_parent, run_one
from rhovae.experiments.stats import paired_difference

__all__ = [
    "IN_USE",
    "MAX_GRID_POINTS",
    "METRICS",
    "METRIC_NAMES",
    "OPTIONAL_METRICS",
    "PRESETS",
    "Experiment",
    "compare",
    "die_with_parent",
    "file_label",
    "load_experiment",
    "paired_difference",
    "print_summary",
    "run_one",
    "write_report",
]
