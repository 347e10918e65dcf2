"""Benchmark harness: SBNN training against surrogate-gradient baselines (``sbnn-bench``)."""

from .harness import METHODS, TASKS, run_grid

__all__ = ["METHODS", "TASKS", "run_grid"]
