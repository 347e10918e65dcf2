"""Benchmark SBNN training against surrogate-gradient baselines, on your model or ours.

* :func:`compare`: your snnTorch / SpikingJelly model (or factory) and data, trained with
  its own surrogate and as SBNN conversions on identical terms; returns
  :class:`BenchResults` (table, notes, curves, per-sample predictions, ``save``).
* ``sbnn-bench`` (:mod:`sbnn_addons.bench.cli`): the same from the command line
  (``--model module:factory --data module:loaders``), and the built-in tasks.
* :func:`stratified_subset`: seeded, class-stratified subset indices.
"""

from .compare import DEFAULT_METHODS, GENERIC_METHODS, Method, compare, default_recipe
from .data import check_subset_classes, stratified_subset
from .harness import METHODS, TASKS, run_grid, run_task
from .results import COLUMNS, BenchResults

__all__ = ["compare", "BenchResults", "Method", "GENERIC_METHODS", "DEFAULT_METHODS",
           "COLUMNS", "default_recipe", "stratified_subset", "check_subset_classes",
           "METHODS", "TASKS", "run_grid", "run_task"]
