"""Heads and normalisation, against direct formulas."""

import jax
import numpy as np
import pytest

from fewshot import heads


def _features(shape=(5, 6), seed=1, scale=1.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * scale


def test_l2_normalize_gives_unit_rows_and_columns():
  x = _features()
  np.testing.assert_allclose(np.linalg.norm(heads.l2_normalize(x), axis=-1),
                             1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(heads.l2_normalize(x, 0), axis=0),
                             1.0, rtol=1e-6)
  assert np.isfinite(heads.l2_normalize(np.zeros((2, 3)))).all()


def test_cosine_head_logits_are_scaled_cosines_bounded_by_the_scale():
  head = heads.init_head(jax.random.key(0), 6, 4, kind='cosine',
                         init_scale=3.0)
  features = _features(scale=100)
  logits = np.asarray(heads.classifier_logits(features, head))
  kernel = np.asarray(head['kernel'])
  cosines = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  np.testing.assert_allclose(logits, 3.0 * cosines, rtol=1e-4, atol=1e-5)
  assert logits.shape == (5, 4) and np.abs(logits).max() <= 3.0 + 1e-4
  with pytest.raises(ValueError, match='head kind'):
    heads.init_head(jax.random.key(0), 6, 4, kind='mlp')


def test_linear_head_init_is_torch_like_and_its_logits_affine():
  head = heads.init_head(jax.random.key(0), 16, 3)
  assert head['kernel'].shape == (16, 3) and head['bias'].shape == (3,)
  assert np.abs(head['kernel']).max() <= 0.25  # 1 / sqrt(16)
  assert np.abs(head['bias']).max() <= 0.25
  features = _features((5, 16))
  np.testing.assert_allclose(
      heads.classifier_logits(features, head),
      features @ np.asarray(head['kernel']) + np.asarray(head['bias']),
      rtol=1e-5, atol=1e-5)


def test_prototype_head_gives_the_softmax_of_negative_squared_distances():
  support = _features((6, 4), seed=2)
  labels = np.array([0, 0, 1, 1, 2, 2])
  protos = heads.prototypes(support, labels, 3)
  np.testing.assert_allclose(protos, [support[2 * c:2 * c + 2].mean(0)
                                      for c in range(3)], rtol=1e-6)
  queries = _features((5, 4), seed=3)
  distances = ((queries[:, None] - np.asarray(protos)[None]) ** 2).sum(-1)
  np.testing.assert_allclose(heads.squared_distances(queries, protos),
                             distances, rtol=1e-4, atol=1e-5)
  logits = np.asarray(heads.linear_logits(queries,
                                          heads.prototype_head(protos)))
  # Equal to -distances up to a per-row constant (|q|^2): the same softmax.
  np.testing.assert_allclose(logits - logits[:, :1],
                             -(distances - distances[:, :1]), rtol=1e-4,
                             atol=1e-4)
