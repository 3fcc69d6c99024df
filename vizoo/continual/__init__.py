"""Continual learning with CLR: a frozen backbone reprogrammed per task (see `vizoo.continual.bank`).

- `ContinualModel`: the task bank (``add_task``, ``set_task``, ``save_task``/``load_task``,
  ``export_functions`` for one file holding every task);
- `METHODS`: CLR, CLR-Full and the baselines they are compared with;
- `run_sequence`: train a task sequence through the engine, one run per task, and record the
  accuracy matrix (resumable per task and inside a task);
- `vizoo continual`: the bundled benchmark (`vizoo.continual.benchmark`).
"""
from .bank import ContinualModel, is_norm_layer
from .methods import METHODS, Method, get_method

__all__ = ["ContinualModel", "METHODS", "Method", "get_method", "is_norm_layer"]
