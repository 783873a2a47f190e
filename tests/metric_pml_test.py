"""Every metric loss and miner against pytorch-metric-learning's own, on the
same random embeddings, labels and loss parameters (values and gradients).

Skipped where torch or pytorch-metric-learning is not installed
(`pip install torch pytorch-metric-learning`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pml = pytest.importorskip('pytorch_metric_learning')
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

from fewshot import metric  # noqa: E402

B, D, C = 24, 8, 5


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D)).astype(np.float32)
  y = np.concatenate([np.arange(C), rng.integers(0, C, B - C)]).astype(
      np.int32)
  return x, y


def _torch_value_and_grad(loss_fn, x, y, miner=None, params=None):
  xt = torch.tensor(x, requires_grad=True)
  yt = torch.tensor(y, dtype=torch.long)
  if params is not None:
    name, value = params
    getattr(loss_fn, name).data = torch.tensor(value)
  mined = miner(xt, yt) if miner is not None else None
  loss = loss_fn(xt, yt, mined)
  loss.backward()
  return float(loss.detach()), xt.grad.numpy()


def _ours(loss, x, y, params):
  value, grad = jax.value_and_grad(loss.apply, argnums=1)(
      params, jnp.asarray(x), jnp.asarray(y))
  return float(value), np.asarray(grad)


# (our loss, its options, pytorch-metric-learning's loss, its miner or None)
CASES = {
    'contrastive': (dict(name='contrastive', pos_margin=0.1, neg_margin=0.9),
                    lambda: pml_losses.ContrastiveLoss(0.1, 0.9), None),
    'contrastive_cosine': (
        dict(name='contrastive', pos_margin=0.8, neg_margin=0.2,
             distance='cosine'),
        lambda: pml_losses.ContrastiveLoss(
            0.8, 0.2, distance=pml_distances.CosineSimilarity()), None),
    'triplet': (dict(name='triplet', margin=0.2),
                lambda: pml_losses.TripletMarginLoss(0.2), None),
    'triplet_unnormalized_swap': (
        dict(name='triplet', margin=0.5, swap=True,
             distance=metric.Distance('euclidean', normalize=False)),
        lambda: pml_losses.TripletMarginLoss(
            0.5, swap=True,
            distance=pml_distances.LpDistance(normalize_embeddings=False)),
        None),
    'triplet_soft': (dict(name='triplet', margin=0.0, smooth=True),
                     lambda: pml_losses.TripletMarginLoss(0.0,
                                                          smooth_loss=True),
                     None),
    'triplet_semihard': (
        dict(name='triplet', margin=0.1, miner='semihard',
             miner_options=dict(margin=0.3)),
        lambda: pml_losses.TripletMarginLoss(0.1),
        lambda: pml_miners.TripletMarginMiner(0.3, type_of_triplets='semihard')),
    'triplet_batch_hard': (
        dict(name='triplet', margin=0.2, miner='batch_hard'),
        lambda: pml_losses.TripletMarginLoss(0.2),
        lambda: pml_miners.BatchHardMiner()),
    'triplet_hard_squared': (
        dict(name='triplet', margin=0.3, distance='squared',
             miner='triplet_margin', miner_options=dict(margin=0.3,
                                                        kind='hard')),
        lambda: pml_losses.TripletMarginLoss(
            0.3, distance=pml_distances.LpDistance(power=2)),
        lambda: pml_miners.TripletMarginMiner(
            0.3, type_of_triplets='hard',
            distance=pml_distances.LpDistance(power=2))),
    'multi_similarity': (dict(name='multi_similarity', alpha=2.0, beta=40.0,
                              base=0.4),
                         lambda: pml_losses.MultiSimilarityLoss(2, 40, 0.4),
                         None),
    'multi_similarity_mined': (
        dict(name='multi_similarity', miner='multi_similarity',
             miner_options=dict(epsilon=0.2)),
        lambda: pml_losses.MultiSimilarityLoss(),
        lambda: pml_miners.MultiSimilarityMiner(0.2)),
    'ntxent': (dict(name='ntxent', temperature=0.3),
               lambda: pml_losses.NTXentLoss(0.3), None),
    'ntxent_euclidean': (
        dict(name='ntxent', temperature=0.5, distance='euclidean'),
        lambda: pml_losses.NTXentLoss(0.5,
                                      distance=pml_distances.LpDistance()),
        None),
    'supcon': (dict(name='supcon', temperature=0.2),
               lambda: pml_losses.SupConLoss(0.2), None),
}


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('seed', [0, 1])
def test_pair_losses_equal_pytorch_metric_learning(case, seed):
  options, make_theirs, make_miner = CASES[case]
  x, y = _batch(seed)
  ours = _ours(metric.metric_loss(**options), x, y, {})
  theirs = _torch_value_and_grad(make_theirs(), x, y,
                                 make_miner() if make_miner else None)
  assert theirs[0] != 0.0
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, err_msg=case)
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-5,
                             err_msg=case)


PARAMETRIC = {
    'proxy_nca': (dict(name='proxy_nca', softmax_scale=4.0),
                  lambda: pml_losses.ProxyNCALoss(C, D, softmax_scale=4.0),
                  'proxies', False),
    'proxy_anchor': (dict(name='proxy_anchor', margin=0.2, alpha=16.0),
                     lambda: pml_losses.ProxyAnchorLoss(C, D, margin=0.2,
                                                        alpha=16),
                     'proxies', False),
    'normface': (dict(name='normface', temperature=0.1),
                 lambda: pml_losses.NormalizedSoftmaxLoss(C, D, 0.1),
                 'W', True),
    'cosface': (dict(name='cosface', margin=0.3, scale=30.0),
                lambda: pml_losses.CosFaceLoss(C, D, margin=0.3, scale=30),
                'W', True),
    'arcface': (dict(name='arcface', margin=28.6, scale=64.0),
                lambda: pml_losses.ArcFaceLoss(C, D, margin=28.6, scale=64),
                'W', True),
    'subcenter_arcface': (
        dict(name='subcenter_arcface', margin=20.0, scale=30.0,
             sub_centers=3),
        lambda: pml_losses.SubCenterArcFaceLoss(
            num_classes=C, embedding_size=D, margin=20.0, scale=30,
            sub_centers=3), 'W', True),
}


@pytest.mark.parametrize('case', sorted(PARAMETRIC))
def test_parametric_losses_equal_pytorch_metric_learning(case):
  options, make_theirs, attribute, is_kernel = PARAMETRIC[case]
  x, y = _batch(3)
  loss = metric.metric_loss(**options)
  params = loss.init(jax.random.key(1), C, D)
  value = np.asarray(next(iter(params.values())))
  ours = _ours(loss, x, y, params)
  theirs = _torch_value_and_grad(make_theirs(), x, y,
                                 params=(attribute, value))
  assert value.shape[0] == (D if is_kernel else C)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, err_msg=case)
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-5,
                             err_msg=case)


def _pml_triplet_set(mined):
  return set(zip(*(t.numpy().tolist() for t in mined)))


def test_miners_select_what_pytorch_metric_learning_selects():
  x, y = _batch(4)
  xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
  from fewshot.metric import miners
  ours = miners.batch_hard_miner(x, y)
  assert (set(map(tuple, np.argwhere(np.asarray(ours.mask))))
          == _pml_triplet_set(pml_miners.BatchHardMiner()(xt, yt)))
  for kind in ('all', 'hard', 'semihard', 'easy'):
    ours = miners.triplet_margin_miner(x, y, margin=0.25, kind=kind)
    theirs = pml_miners.TripletMarginMiner(0.25, type_of_triplets=kind)(xt, yt)
    assert (set(map(tuple, np.argwhere(np.asarray(ours.mask))))
            == _pml_triplet_set(theirs)), kind
  ours = miners.multi_similarity_miner(x, y, epsilon=0.15)
  a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.15)(xt, yt)
  assert set(map(tuple, np.argwhere(np.asarray(ours.positive)))) == set(
      zip(a1.tolist(), p.tolist()))
  assert set(map(tuple, np.argwhere(np.asarray(ours.negative)))) == set(
      zip(a2.tolist(), n.tolist()))
