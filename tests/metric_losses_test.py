"""Metric-learning losses and miners against naive loops over pairs and
triplets, and against pytorch-metric-learning where it installs."""

import itertools
import math

import jax
import numpy as np
import pytest

from fewshot import metric
from fewshot.metric import miners, pair_losses, proxy_losses, softmax_losses
from fewshot.metric.distances import Distance


def _batch(size=12, dim=6, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  embeddings = rng.normal(size=(size, dim)).astype(np.float32)
  labels = np.concatenate([np.arange(classes),
                           rng.integers(0, classes, size - classes)])
  return embeddings, labels.astype(np.int32)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive_matrix(x, kind, normalize=True, y=None):
  y = x if y is None else y
  if normalize or kind == 'cosine':
    x, y = _unit(x), _unit(y)
  out = np.zeros((len(x), len(y)))
  for i, j in itertools.product(range(len(x)), range(len(y))):
    if kind == 'cosine':
      out[i, j] = x[i] @ y[j]
    else:
      out[i, j] = np.sum((x[i] - y[j]) ** 2)
      out[i, j] = out[i, j] if kind == 'squared' else math.sqrt(out[i, j])
  return out


def _mean_nonzero(values):
  values = [v for v in values if v > 0]
  return float(np.mean(values)) if values else 0.0


# ---- naive references, written from the papers' definitions -------------

def naive_contrastive(x, y, pos_margin=0.0, neg_margin=1.0):
  d = _naive_matrix(x, 'euclidean')
  pos, neg = [], []
  for i, j in itertools.permutations(range(len(x)), 2):
    if y[i] == y[j]:
      pos.append(max(d[i, j] - pos_margin, 0))
    else:
      neg.append(max(neg_margin - d[i, j], 0))
  return _mean_nonzero(pos) + _mean_nonzero(neg)


def _triplets(y):
  for a, p, n in itertools.product(range(len(y)), repeat=3):
    if a != p and y[a] == y[p] and y[a] != y[n]:
      yield a, p, n


def naive_triplet(x, y, margin=0.05, smooth=False, triplets=None):
  d = _naive_matrix(x, 'euclidean')
  losses = []
  for a, p, n in (triplets if triplets is not None else _triplets(y)):
    v = d[a, p] - d[a, n] + margin
    losses.append(math.log1p(math.exp(v)) if smooth else max(v, 0))
  return _mean_nonzero(losses)


def naive_multi_similarity(x, y, alpha=2.0, beta=50.0, base=0.5, pairs=None):
  s = _naive_matrix(x, 'cosine')
  total = 0.0
  for a in range(len(x)):
    pos = [s[a, j] for j in range(len(x)) if j != a and y[j] == y[a]
           and (pairs is None or pairs[0][a, j])]
    neg = [s[a, j] for j in range(len(x)) if y[j] != y[a]
           and (pairs is None or pairs[1][a, j])]
    total += math.log1p(sum(math.exp(-alpha * (v - base)) for v in pos)) / alpha
    total += math.log1p(sum(math.exp(beta * (v - base)) for v in neg)) / beta
  return total / len(x)


def naive_ntxent(x, y, temperature=0.07):
  s = _naive_matrix(x, 'cosine') / temperature
  losses = []
  for a, p in itertools.permutations(range(len(x)), 2):
    if y[a] == y[p]:
      negatives = [math.exp(s[a, n]) for n in range(len(x)) if y[n] != y[a]]
      losses.append(-math.log(math.exp(s[a, p])
                              / (math.exp(s[a, p]) + sum(negatives))))
  return float(np.mean(losses))


def naive_supcon(x, y, temperature=0.1):
  s = _naive_matrix(x, 'cosine') / temperature
  losses = []
  for a in range(len(x)):
    others = [j for j in range(len(x)) if j != a]
    positives = [p for p in others if y[p] == y[a]]
    if not positives:
      continue
    log_denominator = math.log(sum(math.exp(s[a, j]) for j in others))
    losses.append(-np.mean([s[a, p] - log_denominator for p in positives]))
  return _mean_nonzero(losses)


def naive_proxy_nca(x, y, proxies, softmax_scale=1.0):
  d = _naive_matrix(x, 'squared', y=proxies)
  losses = []
  for i in range(len(x)):
    weights = [math.exp(-softmax_scale * d[i, c]) for c in range(len(proxies))]
    losses.append(-math.log(weights[y[i]] / sum(weights)))
  return float(np.mean(losses))


def naive_proxy_anchor(x, y, proxies, margin=0.1, alpha=32.0):
  s = _naive_matrix(x, 'cosine', y=proxies)
  pos_terms, neg_terms = [], []
  for c in range(len(proxies)):
    members = [i for i in range(len(x)) if y[i] == c]
    if members:
      pos_terms.append(math.log1p(sum(math.exp(-alpha * (s[i, c] - margin))
                                      for i in members)))
    neg_terms.append(math.log1p(sum(math.exp(alpha * (s[i, c] + margin))
                                    for i in range(len(x)) if y[i] != c)))
  return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(proxies)


def naive_margin_softmax(x, y, kernel, kind, margin=0.0, scale=1.0,
                         sub_centers=1):
  cos = _naive_matrix(x, 'cosine', y=kernel.T)
  cos = cos.reshape(len(x), -1, sub_centers).max(-1)
  losses = []
  for i in range(len(x)):
    logits = scale * cos[i].copy()
    target = cos[i, y[i]]
    if kind == 'cosface':
      logits[y[i]] = scale * (target - margin)
    elif kind == 'arcface':
      theta, m = math.acos(target), math.radians(margin)
      logits[y[i]] = scale * (math.cos(theta + m) if theta + m <= math.pi
                              else target - m * math.sin(m))
    logits -= logits.max()
    losses.append(-(logits[y[i]] - math.log(np.exp(logits).sum())))
  return float(np.mean(losses))


def _np(fn, *args, **kwargs):
  return float(jax.jit(lambda *a: fn(*a, **kwargs))(*args))


@pytest.mark.parametrize('seed', [0, 1])
def test_pair_losses_match_naive_loops(seed):
  x, y = _batch(seed=seed)
  assert np.isclose(_np(pair_losses.contrastive_loss, x, y, neg_margin=1.2),
                    naive_contrastive(x, y, neg_margin=1.2), rtol=1e-4)
  assert np.isclose(_np(pair_losses.triplet_margin_loss, x, y, margin=0.2),
                    naive_triplet(x, y, margin=0.2), rtol=1e-4)
  assert np.isclose(_np(pair_losses.triplet_margin_loss, x, y, margin=0.0,
                        smooth=True),
                    naive_triplet(x, y, margin=0.0, smooth=True), rtol=1e-4)
  assert np.isclose(_np(pair_losses.multi_similarity_loss, x, y),
                    naive_multi_similarity(x, y), rtol=1e-4)
  assert np.isclose(_np(pair_losses.ntxent_loss, x, y, temperature=0.5),
                    naive_ntxent(x, y, temperature=0.5), rtol=1e-4)
  assert np.isclose(_np(pair_losses.supcon_loss, x, y),
                    naive_supcon(x, y), rtol=1e-4)


def test_parametric_losses_match_naive_loops():
  x, y = _batch()
  proxies = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
  kernel = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
  sub_kernel = np.random.default_rng(5).normal(size=(6, 12)).astype(np.float32)
  assert np.isclose(_np(proxy_losses.proxy_nca_loss, {'proxies': proxies}, x,
                        y, softmax_scale=3.0),
                    naive_proxy_nca(x, y, proxies, 3.0), rtol=1e-4)
  assert np.isclose(_np(proxy_losses.proxy_anchor_loss, {'proxies': proxies},
                        x, y), naive_proxy_anchor(x, y, proxies), rtol=1e-4)
  assert np.isclose(_np(softmax_losses.normface_loss, {'kernel': kernel}, x,
                        y), naive_margin_softmax(x, y, kernel, 'normface',
                                                 scale=20.0), rtol=1e-4)
  assert np.isclose(_np(softmax_losses.cosface_loss, {'kernel': kernel}, x,
                        y), naive_margin_softmax(x, y, kernel, 'cosface', 0.35,
                                                 64.0), rtol=1e-4)
  assert np.isclose(_np(softmax_losses.arcface_loss, {'kernel': kernel}, x,
                        y), naive_margin_softmax(x, y, kernel, 'arcface', 28.6,
                                                 64.0), rtol=1e-4)
  assert np.isclose(
      _np(softmax_losses.subcenter_arcface_loss, {'kernel': sub_kernel}, x, y),
      naive_margin_softmax(x, y, sub_kernel, 'arcface', 28.6, 64.0, 3),
      rtol=1e-4)


def test_arcface_keeps_the_monotone_branch_past_pi_minus_the_margin():
  kernel = np.eye(2, dtype=np.float32)
  x = np.array([[-1.0, 0.05]], np.float32)  # theta ~ 177 degrees from class 0
  y = np.array([0], np.int32)
  value = _np(softmax_losses.arcface_loss, {'kernel': kernel}, x, y,
              margin=20.0, scale=4.0)
  assert np.isclose(value, naive_margin_softmax(x, y, kernel, 'arcface', 20.0,
                                                4.0), rtol=1e-5)


def _naive_batch_hard(x, y):
  d = _naive_matrix(x, 'euclidean')
  out = set()
  for a in range(len(x)):
    pos = [p for p in range(len(x)) if p != a and y[p] == y[a]]
    neg = [n for n in range(len(x)) if y[n] != y[a]]
    if pos and neg:
      out.add((a, max(pos, key=lambda p: d[a, p]),
               min(neg, key=lambda n: d[a, n])))
  return out


def _naive_triplet_margin_miner(x, y, margin, kind):
  d = _naive_matrix(x, 'euclidean')
  out = set()
  for a, p, n in _triplets(y):
    m = d[a, n] - d[a, p]
    keep = {'all': m <= margin, 'hard': m <= min(margin, 0),
            'semihard': 0 < m <= margin, 'easy': m > margin}[kind]
    if keep:
      out.add((a, p, n))
  return out


def _triplet_set(mined):
  return set(map(tuple, np.argwhere(np.asarray(mined.mask))))


def test_miners_match_naive_selection():
  x, y = _batch(size=14, seed=2)
  assert _triplet_set(miners.batch_hard_miner(x, y)) == _naive_batch_hard(x, y)
  for kind in miners.TRIPLET_KINDS:
    assert (_triplet_set(miners.triplet_margin_miner(x, y, margin=0.3,
                                                     kind=kind))
            == _naive_triplet_margin_miner(x, y, 0.3, kind)), kind
  s = _naive_matrix(x, 'cosine')
  mined = miners.multi_similarity_miner(x, y, epsilon=0.1)
  for a in range(len(x)):
    pos = [j for j in range(len(x)) if j != a and y[j] == y[a]]
    neg = [j for j in range(len(x)) if y[j] != y[a]]
    expected_pos = {p for p in pos if s[a, p] - 0.1 < max(s[a, neg])}
    expected_neg = {n for n in neg if s[a, n] + 0.1 > min(s[a, pos])}
    assert set(np.flatnonzero(mined.positive[a])) == expected_pos
    assert set(np.flatnonzero(mined.negative[a])) == expected_neg
  # The loss on mined tuples is the naive loss on exactly those tuples.
  semihard = miners.semihard_miner(x, y)
  assert np.isclose(
      float(pair_losses.triplet_margin_loss(x, y, margin=0.1, mined=semihard)),
      naive_triplet(x, y, 0.1, triplets=_triplet_set(semihard)), rtol=1e-4)
  assert np.isclose(
      float(pair_losses.multi_similarity_loss(x, y, mined=mined)),
      naive_multi_similarity(x, y, pairs=(np.asarray(mined.positive),
                                          np.asarray(mined.negative))),
      rtol=1e-4)


def test_distances_match_naive_matrices():
  x, _ = _batch()
  for kind, normalize in [('euclidean', True), ('euclidean', False),
                          ('squared', False), ('cosine', True)]:
    np.testing.assert_allclose(Distance(kind, normalize).matrix(x),
                               _naive_matrix(x, kind, normalize),
                               rtol=1e-4, atol=2e-3 if kind == 'euclidean'
                               else 1e-4)


def _all_losses():
  for name in sorted(metric.LOSSES):
    yield name, metric.metric_loss(name)
  yield 'triplet+batch_hard', metric.metric_loss('triplet', miner='batch_hard')
  yield 'triplet+semihard', metric.metric_loss('triplet', miner='semihard')
  yield 'ms+ms', metric.metric_loss('multi_similarity',
                                    miner='multi_similarity')


# Without a positive pair, or without a negative, these have no term at all.
_NOTHING_TO_LEARN = ('triplet', 'triplet+batch_hard', 'triplet+semihard',
                     'ntxent', 'supcon')
_CASES = ('random', 'no_positive_pair', 'one_class', 'all_equal',
          'zero_embedding', 'antipodal_classes')


def _case(case):
  x, y = _batch(size=8, dim=5, classes=4)
  if case == 'no_positive_pair':
    y = np.arange(8, dtype=np.int32)
  elif case == 'one_class':
    y = np.zeros(8, np.int32)
  elif case == 'all_equal':
    x = np.ones_like(x)
  elif case == 'zero_embedding':
    x[0] = 0.0
  elif case == 'antipodal_classes':
    # Two well-separated classes: masked-out similarities far above the kept
    # ones (multi-similarity's beta=50) must not overflow in the gradient.
    x = np.zeros_like(x)
    x[:4, 0], x[4:, 0] = 1.0, -1.0
    x[::2, 1] = 1e-3
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  return x, y


def test_degenerate_batches_give_finite_values_and_gradients_under_vmap():
  # Every case at once: one compiled, vmapped value-and-gradient per loss,
  # which also checks that the losses vmap (against an unbatched call).
  xs, ys = map(np.stack, zip(*map(_case, _CASES)))
  for name, loss in _all_losses():
    params = loss.init(jax.random.key(0), 8, 5)

    @jax.jit  # one program with the unbatched call (eagerly: op by op)
    def run(params, xs, ys, loss=loss):
      return jax.vmap(jax.value_and_grad(loss.apply, argnums=(0, 1)),
                      in_axes=(None, 0, 0))(params, xs, ys), loss.apply(
                          params, xs[0], ys[0])

    (values, grads), unbatched = run(params, xs, ys)
    np.testing.assert_allclose(values[0], unbatched, rtol=1e-5, err_msg=name)
    for i, case in enumerate(_CASES):
      assert np.isfinite(float(values[i])), (name, case)
      assert all(np.isfinite(g[i]).all() for g in jax.tree.leaves(grads)), (
          name, case)
      if case in ('no_positive_pair', 'one_class') and name in (
          _NOTHING_TO_LEARN):
        assert float(values[i]) == 0.0, (name, case)


def test_bad_names_and_options_are_named():
  with pytest.raises(ValueError, match="Unknown metric loss 'trplet'.*arcface"):
    metric.metric_loss('trplet')
  with pytest.raises(ValueError, match="Unknown miner 'hardest'.*batch_hard"):
    metric.metric_loss('triplet', miner='hardest')
  with pytest.raises(ValueError, match=r"\['margn'\].*margin"):
    metric.metric_loss('triplet', margn=0.1)
  with pytest.raises(ValueError, match='miners apply to the pair'):
    metric.metric_loss('arcface', miner='batch_hard')
  with pytest.raises(ValueError, match="Unknown distance 'manhattan'"):
    metric.metric_loss('triplet', distance='manhattan')
  with pytest.raises(ValueError, match='no distance option'):
    metric.metric_loss('arcface', distance='cosine')


def test_every_config_recipe_builds_its_loss():
  from fewshot.config_args import METRIC_RECIPES, metric_objective  # pylint: disable=g-import-not-at-top
  assert sorted(METRIC_RECIPES) == sorted(metric.LOSSES)
  for name in METRIC_RECIPES:
    section = metric_objective(name)
    loss = metric.metric_loss(section['loss'], miner=section['miner'],
                              miner_options=section['miner_options'],
                              **section['loss_options'])
    assert loss.name.startswith(name)
  assert metric_objective('triplet', 'none')['miner'] is None
  assert metric_objective('triplet', 'batch_hard')['miner_options'] == {}
