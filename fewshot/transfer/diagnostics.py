"""Negative-transfer diagnostics: feature shift (MMD) and transfer tables."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fewshot.stats import mean_confidence_interval

DEFAULT_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def pairwise_squared_distances(a_NxD: jax.Array, b_MxD: jax.Array) -> jax.Array:
  """`[N, M]` squared Euclidean distances (one matmul, clipped at 0)."""
  cross = a_NxD @ b_MxD.T
  a_sq = jnp.sum(jnp.square(a_NxD), axis=-1)
  b_sq = jnp.sum(jnp.square(b_MxD), axis=-1)
  return jnp.maximum(a_sq[:, None] - 2.0 * cross + b_sq[None, :], 0.0)


def median_bandwidth(source_NxD: jax.Array, target_MxD: jax.Array) -> jax.Array:
  """The median heuristic: median distance between distinct pooled points."""
  pooled = jnp.concatenate([source_NxD, target_MxD], axis=0)
  rows, cols = np.triu_indices(pooled.shape[0], k=1)
  distances = pairwise_squared_distances(pooled, pooled)[rows, cols]
  return jnp.sqrt(jnp.median(distances))


def mmd(source_features: jax.Array, target_features: jax.Array, *,
        bandwidths: Sequence[float] | jax.Array | None = None,
        multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
        biased: bool = False) -> jax.Array:
  """Multi-kernel Gaussian MMD^2 of two samples (Gretton et al. 2012).

  The kernel is the mean of Gaussians `exp(-||x - y||^2 / (2 s^2))` over the
  bandwidths `s` (as in DAN, Long et al. 2015). The unbiased estimator
  leaves out the `i == j` terms of the within-sample sums, so it is near 0
  (and may be slightly negative) for two samples of one distribution, and
  it is symmetric in its arguments.

  Args:
    source_features: `[n, D]`, n >= 2.
    target_features: `[m, D]`, m >= 2.
    bandwidths: kernel bandwidths `s`; by default the median heuristic's
      bandwidth (the median pairwise distance of the pooled samples, an
      O((n+m)^2) computation) times each of `multipliers`.
    multipliers: see `bandwidths`.
    biased: the V-statistic instead of the unbiased U-statistic.

  Returns:
    A scalar, the MMD^2 estimate.
  """
  source = jnp.asarray(source_features, jnp.float32)
  target = jnp.asarray(target_features, jnp.float32)
  n, m = source.shape[0], target.shape[0]
  if n < 2 or m < 2:
    raise ValueError(f'The unbiased MMD needs two samples of at least 2 '
                     f'points, got {n} and {m}.')
  if bandwidths is None:
    bandwidths = median_bandwidth(source, target) * jnp.asarray(
        multipliers, jnp.float32)
  bandwidths = jnp.maximum(jnp.asarray(bandwidths, jnp.float32).reshape(-1),
                           1e-12)

  def kernel(sq_distances):
    # [A, B] distances -> [A, B] kernel, averaged over bandwidths.
    gamma = 1.0 / (2.0 * jnp.square(bandwidths))
    return jnp.mean(jnp.exp(-sq_distances[..., None] * gamma[None, None, :]),
                    axis=-1)

  k_ss = kernel(pairwise_squared_distances(source, source))
  k_tt = kernel(pairwise_squared_distances(target, target))
  k_st = kernel(pairwise_squared_distances(source, target))
  if biased:
    within_source, within_target = jnp.mean(k_ss), jnp.mean(k_tt)
  else:
    within_source = (jnp.sum(k_ss) - jnp.trace(k_ss)) / (n * (n - 1))
    within_target = (jnp.sum(k_tt) - jnp.trace(k_tt)) / (m * (m - 1))
  return within_source + within_target - 2.0 * jnp.mean(k_st)


@dataclasses.dataclass(frozen=True)
class TransferReport:
  """Rows comparing pretrained-and-adapted against from-scratch accuracy.

  Each row is a dict with keys `size`, `pretrained`, `pretrained_ci95`,
  `scratch`, `scratch_ci95`, `gap` (pretrained minus scratch), `gap_ci95`,
  `verdict` ('positive', 'negative' or 'inconclusive': whether the gap's 95%
  interval excludes 0) and `negative_transfer` (verdict == 'negative').
  Accuracies are fractions in [0, 1]. `str(report)` is a markdown table.
  """
  rows: list[dict[str, Any]]
  size_name: str = 'labelled per class'

  def markdown(self) -> str:
    percent = lambda mean, ci: f'{100 * mean:.1f} ± {100 * ci:.1f}'
    lines = [f'| {self.size_name} | pretrained (%) | scratch (%) | gap (pp) '
             '| transfer |',
             '|---:|---:|---:|---:|:---|']
    for row in self.rows:
      verdict = ('**negative transfer**' if row['negative_transfer']
                 else row['verdict'])
      pretrained = percent(row['pretrained'], row['pretrained_ci95'])
      scratch = percent(row['scratch'], row['scratch_ci95'])
      lines.append(
          f"| {row['size']} | {pretrained} | {scratch}"
          f" | {100 * row['gap']:+.1f} ± {100 * row['gap_ci95']:.1f}"
          f' | {verdict} |')
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.markdown()

  @property
  def negative_sizes(self) -> list[int]:
    """The sizes at which transfer significantly hurts."""
    return [row['size'] for row in self.rows if row['negative_transfer']]


def transfer_report(pretrained: Callable[[int], Any],
                    scratch: Callable[[int], Any],
                    sizes: Sequence[int] = (1, 5, 20, 100), *,
                    paired: bool = False,
                    size_name: str = 'labelled per class',
                    print_table: bool = False) -> TransferReport:
  """Compares transfer with training from scratch at several target sizes.

  Args:
    pretrained: `size -> accuracies`: trains (adapts) the pretrained model
      with `size` labelled target examples per class and returns at least two
      accuracies in [0, 1] (one per test episode, or per seed).
    scratch: the same for a model that did not see the source data
      (randomly initialised, or trained from scratch on the target data).
    sizes: the target sizes to try.
    paired: the two callables return accuracies on the same episodes in the
      same order: the gap's interval then comes from per-episode differences
      (tighter); otherwise from the two independent intervals.
    size_name: the first column's heading.
    print_table: also print the markdown table.

  Returns:
    A `TransferReport`.
  """
  rows = []
  for size in sizes:
    pretrained_acc = np.asarray(pretrained(size), np.float64).reshape(-1)
    scratch_acc = np.asarray(scratch(size), np.float64).reshape(-1)
    p_mean, p_ci = mean_confidence_interval(pretrained_acc)
    s_mean, s_ci = mean_confidence_interval(scratch_acc)
    if paired:
      if pretrained_acc.shape != scratch_acc.shape:
        raise ValueError(f'paired=True needs equally many accuracies, got '
                         f'{pretrained_acc.size} and {scratch_acc.size} at '
                         f'size {size}.')
      gap, gap_ci = mean_confidence_interval(pretrained_acc - scratch_acc)
    else:
      gap, gap_ci = p_mean - s_mean, math.hypot(p_ci, s_ci)
    if gap < -gap_ci:
      verdict = 'negative'
    elif gap > gap_ci:
      verdict = 'positive'
    else:
      verdict = 'inconclusive'
    rows.append({'size': int(size), 'pretrained': p_mean,
                 'pretrained_ci95': p_ci, 'scratch': s_mean,
                 'scratch_ci95': s_ci, 'gap': gap, 'gap_ci95': gap_ci,
                 'verdict': verdict,
                 'negative_transfer': verdict == 'negative'})
  report = TransferReport(rows=rows, size_name=size_name)
  if print_table:
    print(report.markdown())
  return report
