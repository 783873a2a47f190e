"""Metric-learning losses, miners, distances and retrieval metrics.

`metric_loss(name, ...)` builds any loss of `LOSSES` as a `MetricLoss`:
`init(key, num_classes, embedding_dim) -> params` (the loss's own
parameters: proxies, class weights; `{}` for pair losses) and
`apply(params, embeddings [B, D], labels [B]) -> loss`, optionally with a
miner of `MINERS` choosing the pairs or triplets. The loss functions
themselves live in `pair_losses`, `proxy_losses` and `softmax_losses`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax

from fewshot.metric import pair_losses, proxy_losses, softmax_losses
from fewshot.metric.distances import (COSINE, DISTANCE_KINDS, EUCLIDEAN,
                                      SQUARED, Distance, as_distance)
from fewshot.metric.miners import MINERS, Pairs, Triplets

Params = Any


class MetricLoss(NamedTuple):
  """A metric-learning loss with its parameters' initialiser.

  `init(key, num_classes, embedding_dim) -> params` and `apply(params,
  embeddings [B, D], labels [B]) -> scalar`; both pure.
  """
  init: Callable[[jax.Array, int, int], Params]
  apply: Callable[[Params, jax.Array, jax.Array], jax.Array]
  name: str


def _no_params(key, num_classes, embedding_dim):
  del key, num_classes, embedding_dim
  return {}


# name -> (loss function, its parameters' initialiser or None for pair losses)
LOSSES: dict[str, tuple[Callable[..., jax.Array], Callable | None]] = {
    'contrastive': (pair_losses.contrastive_loss, None),
    'triplet': (pair_losses.triplet_margin_loss, None),
    'multi_similarity': (pair_losses.multi_similarity_loss, None),
    'ntxent': (pair_losses.ntxent_loss, None),
    'supcon': (pair_losses.supcon_loss, None),
    'proxy_nca': (proxy_losses.proxy_nca_loss, proxy_losses.init_proxies),
    'proxy_anchor': (proxy_losses.proxy_anchor_loss,
                     proxy_losses.init_proxies),
    'normface': (softmax_losses.normface_loss,
                 softmax_losses.init_class_weights),
    'cosface': (softmax_losses.cosface_loss,
                softmax_losses.init_class_weights),
    'arcface': (softmax_losses.arcface_loss,
                softmax_losses.init_class_weights),
    'subcenter_arcface': (softmax_losses.subcenter_arcface_loss,
                          softmax_losses.init_class_weights),
}


def _keyword_options(fn) -> dict[str, Any]:
  return {n: p.default for n, p in inspect.signature(fn).parameters.items()
          if p.kind == p.KEYWORD_ONLY}


def _checked(fn, options: Mapping[str, Any], what: str) -> dict[str, Any]:
  # `distance` has its own argument and `mined` is the miner's output.
  known = set(_keyword_options(fn)) - {'distance', 'mined'}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for {what}; it accepts '
                     f'{sorted(known)} (and distance).')
  return dict(options)


def _with_distance(fn, options: dict[str, Any], distance, what: str):
  known = _keyword_options(fn)
  if 'distance' in known:
    options['distance'] = as_distance(distance, known['distance'])
  elif distance is not None:
    raise ValueError(f'{what} has no distance option (it uses cosines).')
  return options


def metric_loss(name: str, *, distance: Distance | str | None = None,
                miner: str | None = None,
                miner_options: Mapping[str, Any] | None = None,
                **options: Any) -> MetricLoss:
  """The loss `LOSSES[name]` with `options`, on `distance`, after `miner`.

  Args:
    name: a key of `LOSSES`.
    distance: 'euclidean', 'squared', 'cosine' or a `Distance`; default the
      loss's own (pytorch-metric-learning's).
    miner: a key of `MINERS`, for the pair and triplet losses; it measures
      with the loss's distance unless `miner_options` sets another.
    miner_options: the miner's keyword arguments (e.g. `margin`, `epsilon`).
    **options: the loss's keyword arguments (margins, temperature, scale,
      `sub_centers`, ...).
  """
  if name not in LOSSES:
    raise ValueError(f'Unknown metric loss {name!r}; known: {sorted(LOSSES)}.')
  fn, init = LOSSES[name]
  what = f'metric loss {name!r}'
  init_options = {}
  if init is not None and 'sub_centers' in _keyword_options(fn):
    init_options['sub_centers'] = options.get(
        'sub_centers', _keyword_options(fn)['sub_centers'])
  options = _with_distance(fn, _checked(fn, options, what), distance, what)
  loss_fn = functools.partial(fn, **options)

  if miner is not None:
    if init is not None:
      raise ValueError(f'{what} learns from proxies or class weights; miners '
                       'apply to the pair and triplet losses '
                       f'({", ".join(n for n, v in LOSSES.items() if v[1] is None)}).')
    if miner not in MINERS:
      raise ValueError(f'Unknown miner {miner!r}; known: {sorted(MINERS)}.')
    miner_fn = MINERS[miner]
    mine_options = dict(miner_options or {})
    mine_distance = mine_options.pop('distance', None)
    mine_options = _checked(miner_fn, mine_options, f'miner {miner!r}')
    if 'distance' in _keyword_options(miner_fn):
      mine_options['distance'] = as_distance(
          mine_distance, options.get('distance', EUCLIDEAN))
    mine = functools.partial(miner_fn, **mine_options)
  elif miner_options:
    raise ValueError('miner_options are set but no miner is.')

  def apply(params, embeddings_BxD, labels_B):
    if init is not None:
      return loss_fn(params, embeddings_BxD, labels_B)
    del params
    mined = None if miner is None else mine(embeddings_BxD, labels_B)
    return loss_fn(embeddings_BxD, labels_B, mined=mined)

  if init is None:
    make_params = _no_params
  else:
    make_params = lambda key, c, d: init(key, c, d, **init_options)
  label = name if miner is None else f'{name}+{miner}'
  return MetricLoss(init=make_params, apply=apply, name=label)


__all__ = ['COSINE', 'DISTANCE_KINDS', 'Distance', 'EUCLIDEAN', 'LOSSES',
           'MINERS', 'MetricLoss', 'Pairs', 'SQUARED', 'Triplets',
           'metric_loss']
