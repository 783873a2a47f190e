"""Retrieval metrics against a naive numpy ranking, and against
pytorch-metric-learning's AccuracyCalculator where it installs."""

import jax
import numpy as np
import pytest

from fewshot.metric import clustering, retrieval


def _embedded(num_classes=7, seed=0, spread=1.5):
  rng = np.random.default_rng(seed)
  counts = rng.integers(2, 9, num_classes)
  labels = np.repeat(np.arange(num_classes), counts)
  centres = rng.normal(size=(num_classes, 5))
  x = centres[labels] * spread + rng.normal(size=(len(labels), 5))
  return x.astype(np.float32), labels


def _naive(x, labels, ks=(1, 2, 4, 8), raw=False):
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  closeness = ((lambda q, m: -float(np.sum((x[q] - x[m]) ** 2))) if raw else
               (lambda q, m: float(unit[q] @ unit[m])))
  p1, rp, ap, recall = [], [], [], {k: [] for k in ks}
  for q in range(len(x)):
    r = int(np.sum(labels == labels[q])) - 1
    if r == 0:
      continue
    others = [m for m in range(len(x)) if m != q]
    ranked = sorted(others, key=lambda m: -closeness(q, m))
    hits = [labels[m] == labels[q] for m in ranked]
    p1.append(hits[0])
    rp.append(sum(hits[:r]) / r)
    ap.append(sum(sum(hits[:i + 1]) / (i + 1) for i in range(r) if hits[i])
              / r)
    for k in ks:
      recall[k].append(any(hits[:k]))
  return dict(precision_at_1=np.mean(p1), r_precision=np.mean(rp),
              map_at_r=np.mean(ap),
              recall_at_k={str(k): np.mean(v) for k, v in recall.items()})


@pytest.mark.parametrize('chunk_size', [1, 5, 1024])
def test_metrics_match_a_naive_ranking_for_any_chunking(chunk_size):
  x, labels = _embedded()
  ours = retrieval.retrieval_metrics(x, labels, chunk_size=chunk_size)
  expected = _naive(x, labels)
  for name in ('precision_at_1', 'r_precision', 'map_at_r'):
    assert np.isclose(ours[name], expected[name]), name
  assert ours['recall_at_k'] == pytest.approx(expected['recall_at_k'])
  assert ours['queries'] == len(labels)
  assert 0 < ours['map_at_r'] <= ours['r_precision'] <= 1


def test_raw_distances_rank_the_embeddings_as_they_are():
  x, labels = _embedded(seed=1)
  x[::3] *= 4.0  # norms differ: raw and normalised rankings disagree
  raw = retrieval.retrieval_metrics(x, labels, distance='raw_euclidean')
  expected = _naive(x, labels, raw=True)
  assert np.isclose(raw['map_at_r'], expected['map_at_r'])
  assert not np.isclose(raw['map_at_r'], _naive(x, labels)['map_at_r'])
  with pytest.raises(ValueError, match="Unknown distance 'l1'.*raw_squared"):
    retrieval.retrieval_metrics(x, labels, distance='l1')


def test_perfect_and_lone_queries():
  labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3])
  x = np.eye(4, dtype=np.float32)[labels] + 0.01 * np.arange(9)[:, None]
  result = retrieval.retrieval_metrics(x, labels, recall_ks=(1, 2))
  assert result['map_at_r'] == result['precision_at_1'] == 1.0
  assert result['queries'] == 8  # class 2's only image queries nothing
  with pytest.raises(ValueError, match='at least two images'):
    retrieval.retrieval_metrics(x[:4], np.arange(4), recall_ks=(1,))


def test_matches_pytorch_metric_learning_accuracy_calculator():
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_metric_learning')
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning.distances import CosineSimilarity  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning.utils.inference import CustomKNN  # pylint: disable=g-import-not-at-top
  x, labels = _embedded(num_classes=12, seed=3, spread=1.0)
  calculator = AccuracyCalculator(
      include=('precision_at_1', 'r_precision',
               'mean_average_precision_at_r'),
      knn_func=CustomKNN(CosineSimilarity()))
  xt, yt = torch.tensor(x), torch.tensor(labels)
  theirs = calculator.get_accuracy(xt, yt, xt, yt, ref_includes_query=True)
  ours = retrieval.retrieval_metrics(x, labels)
  assert np.isclose(ours['precision_at_1'], theirs['precision_at_1'])
  assert np.isclose(ours['r_precision'], theirs['r_precision'])
  assert np.isclose(ours['map_at_r'], theirs['mean_average_precision_at_r'])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_nmi_matches_scikit_learn(seed):
  metrics = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 5, 60)
  b = np.where(rng.random(60) < 0.6, a, rng.integers(0, 7, 60)) + 10
  np.testing.assert_allclose(
      clustering.normalized_mutual_information(a, b),
      metrics.normalized_mutual_info_score(a, b), rtol=1e-10)
  assert clustering.normalized_mutual_information(a, a + 3) == pytest.approx(1)
  assert clustering.normalized_mutual_information(np.zeros(4),
                                                  np.ones(4)) == 1.0
  with pytest.raises(ValueError, match='same items'):
    clustering.normalized_mutual_information(a, b[:5])


def test_kmeans_finds_separated_clusters_and_scikit_learns_inertia():
  cluster = pytest.importorskip('sklearn.cluster')
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(6), 15)
  x = (rng.normal(size=(6, 4)) * 20)[labels] + rng.normal(size=(90, 4))
  assign, inertia = clustering.kmeans(x.astype(np.float32), 6,
                                      jax.random.key(0))
  assert clustering.normalized_mutual_information(assign, labels) == 1.0
  reference = cluster.KMeans(6, n_init=3, random_state=0).fit(x).inertia_
  np.testing.assert_allclose(inertia, reference, rtol=1e-4)
  # The figure AccuracyCalculator reports: clusters of the (normalised)
  # embeddings against the classes.
  assert clustering.kmeans_nmi(x, labels, normalize=False) == 1.0
  noise = rng.normal(size=(90, 4)).astype(np.float32)
  assert clustering.kmeans_nmi(noise, labels) < 0.5
