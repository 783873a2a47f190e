"""Confidence intervals of per-episode (or per-seed) measurements."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def mean_confidence_interval(values: Any) -> tuple[float, float]:
  """Mean and the half-width of its 95% normal confidence interval.

  `1.96 * std / sqrt(n)` with the sample standard deviation (ddof=1), the
  convention of the few-shot literature.
  """
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  if values.size < 2:
    raise ValueError('A confidence interval needs at least two values.')
  return (float(values.mean()),
          float(1.96 * values.std(ddof=1) / math.sqrt(values.size)))


def summarize(accuracies: Any) -> dict[str, float]:
  """`{'accuracy', 'ci95', 'episodes'}`: mean and 95% CI half-width."""
  mean, ci95 = mean_confidence_interval(accuracies)
  return {'accuracy': mean, 'ci95': ci95, 'episodes': int(np.size(accuracies))}


__all__ = ['mean_confidence_interval', 'summarize']
