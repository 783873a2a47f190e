"""Confidence intervals."""

import math
import statistics

import numpy as np
import pytest

from fewshot import stats


def test_confidence_interval_formula():
  values = [0.5, 0.75, 1.0, 0.25, 0.6]
  mean, ci = stats.mean_confidence_interval(values)
  assert mean == pytest.approx(sum(values) / 5)
  assert ci == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(5))
  with pytest.raises(ValueError, match='at least two'):
    stats.mean_confidence_interval([1.0])


def test_summarize_counts_episodes():
  summary = stats.summarize(np.array([1.0, 0.0, 0.5, 0.5]))
  assert summary == {'accuracy': 0.5, 'episodes': 4,
                     'ci95': pytest.approx(1.96 * statistics.stdev(
                         [1.0, 0.0, 0.5, 0.5]) / 2)}
