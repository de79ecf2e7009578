"""Data-aware estimators: they read few-shot / calibration data and write Coefficients artifacts for the kernels.

Estimators: ``apl`` (activated parameter locating), ``sens`` (Sens-Merging), ``slta`` (submodule linearity),
``cocktail`` (LM-Cocktail), ``fisher`` (Fisher merging), ``regmean`` (RegMean). See docs/methods.md §1–§4, §5.11–§5.13, §8.
"""

from mergeflow.importance.base import (
    Estimator,
    ImportanceRun,
    ModelRef,
    all_estimators,
    compute_coefficients,
    get_estimator,
    register_estimator,
)
from mergeflow.importance.data import Example, TaskData, load_task_data

__all__ = ["Estimator", "Example", "ImportanceRun", "ModelRef", "TaskData", "all_estimators",
           "compute_coefficients", "get_estimator", "load_task_data", "register_estimator"]
