"""`fewshot.ops`: values and gradients (first and second order) against the
plain lax ops, finite differences, vmap over per-task kernels, jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from fewshot.ops import conv as conv_lib
from fewshot.ops import conv2d, depthwise_conv2d, max_pool_2x2

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _plain_conv(x, w, padding='SAME'):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)


def _fast_conv(padding='SAME'):
  # impl='cpu' exercises the custom-gradient path on any backend.
  return lambda x, w: conv2d(x, w, padding=padding, impl='cpu')


def _plain_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def _normal(seed, shape, dtype=np.float32):
  # numpy, not jax.random: compiling a sampler per shape would dominate.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _assert_close(actual, expected, tol=1e-4):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  np.testing.assert_allclose(actual / scale, expected / scale, atol=tol, rtol=0)


# (B, H, W, I, O, kh, kw, padding): I * kh * kw <= 32 takes the im2col path.
CONV_CASES = [
    (3, 8, 7, 1, 6, 3, 3, 'SAME'),     # first layer, im2col
    (2, 9, 6, 3, 5, 3, 3, 'VALID'),    # im2col, VALID
    (3, 7, 8, 40, 6, 3, 3, 'SAME'),    # XLA conv + weight-grad path
    (2, 8, 8, 40, 4, 3, 3, 'VALID'),
    (2, 7, 6, 8, 4, 5, 5, 'SAME'),     # larger odd kernel
    (2, 6, 7, 12, 4, 1, 3, ((0, 0), (1, 2))),  # explicit asymmetric padding
]


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_values_and_gradients_match_lax(case):
  b, h, w, cin, cout, kh, kw, padding = case
  x, k = _normal(0, (b, h, w, cin)), _normal(1, (kh, kw, cin, cout))
  fast, plain = _fast_conv(padding), lambda x, k: _plain_conv(x, k, padding)
  g = _normal(2, jax.eval_shape(plain, x, k).shape)

  @jax.jit
  def both(x, k, g):
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(fast, x, k), jax.vjp(plain, x, k)
    return (y, *vjp(g)), (y_ref, *vjp_ref(g))

  got, want = both(x, k, g)
  for a, e in zip(got, want):
    assert a.shape == e.shape
    _assert_close(a, e)


@pytest.mark.parametrize('case', [CONV_CASES[0], CONV_CASES[2], CONV_CASES[3]])
def test_conv_second_order_matches_lax(case):
  b, h, w, cin, cout, kh, kw, padding = case
  x, k = _normal(0, (b, h, w, cin)), _normal(1, (kh, kw, cin, cout))
  g = _normal(2, _plain_conv(x, k, padding).shape)

  def outer(conv):
    # MAML-like: a loss of the inner gradient, differentiated again.
    def inner_loss(x, k):
      return jnp.sum(jnp.tanh(conv(x, k)) * g)

    def f(x, k):
      gx, gk = jax.grad(inner_loss, (0, 1))(x, k)
      adapted = k - 0.1 * gk
      return jnp.sum(jnp.sin(conv(x, adapted))) + jnp.sum(gx ** 2)
    return jax.grad(f, (0, 1))

  got, want = jax.jit(lambda x, k: (
      outer(_fast_conv(padding))(x, k),
      outer(lambda x, k: _plain_conv(x, k, padding))(x, k)))(x, k)
  for a, e in zip(got, want):
    _assert_close(a, e, tol=2e-4)


@pytest.mark.parametrize('cin', [2, 6])
def test_conv_finite_differences_order_2(cin):
  with jax.enable_x64(True):
    x = _normal(0, (2, 5, 4, cin), np.float64)
    k = _normal(1, (3, 3, cin, 3), np.float64)
    check_grads(_fast_conv(), (x, k), order=2, modes=('rev',))


def test_conv_chunked_weight_gradient(monkeypatch):
  # Forces the chunked weight-gradient path (uneven last chunk) on tiny data.
  x, k = _normal(0, (7, 6, 6, 40)), _normal(1, (3, 3, 40, 5))
  g = _normal(2, (7, 6, 6, 5))
  monkeypatch.setattr(conv_lib, '_WGRAD_CHUNK_BYTES', 3 * 6 * 6 * 40 * 4)
  got, want = jax.jit(lambda x, k, g: (
      jax.vjp(_fast_conv(), x, k)[1](g)[1],
      jax.vjp(_plain_conv, x, k)[1](g)[1]))(x, k, g)
  _assert_close(got, want)


@pytest.mark.parametrize('cin', [1, 16])
def test_conv_vmap_over_kernels_equals_loop(cin):
  # Per-task kernels (MAML): vmap over both the images and the kernels, and
  # over the kernels only.
  tasks = 3
  xs, ks = _normal(0, (tasks, 4, 6, 6, cin)), _normal(1, (tasks, 3, 3, cin, 5))
  fast = _fast_conv()

  def loss(x, k):
    return jnp.sum(jnp.tanh(fast(x, k)))

  @jax.jit
  def run(xs, ks):
    batched = jax.vmap(jax.value_and_grad(loss, (0, 1)))(xs, ks)
    looped = [jax.value_and_grad(loss, (0, 1))(xs[t], ks[t])
              for t in range(tasks)]
    shared_x = jax.vmap(fast, in_axes=(None, 0))(xs[0], ks)
    shared_ref = [_plain_conv(xs[0], ks[t]) for t in range(tasks)]
    return batched, looped, shared_x, shared_ref

  batched, looped, shared_x, shared_ref = run(xs, ks)
  for t in range(tasks):
    _assert_close(batched[0][t], looped[t][0])
    _assert_close(batched[1][0][t], looped[t][1][0])
    _assert_close(batched[1][1][t], looped[t][1][1])
    _assert_close(shared_x[t], shared_ref[t])


def test_conv_vmap_shared_kernel_and_nested():
  xs, k = _normal(0, (2, 3, 3, 5, 5, 4)), _normal(1, (3, 3, 4, 3))
  fast = _fast_conv()

  def loss(k, x):
    return jnp.sum(jnp.tanh(fast(x, k)))

  @jax.jit
  def run(xs, k):
    # Per-task gradients of a shared kernel, vmapped twice.
    nested = jax.vmap(jax.vmap(jax.grad(loss), (None, 0)), (None, 0))(k, xs)
    looped = [[jax.grad(loss)(k, xs[i, j]) for j in range(3)]
              for i in range(2)]
    return nested, looped

  nested, looped = run(xs, k)
  for i in range(2):
    for j in range(3):
      _assert_close(nested[i, j], looped[i][j])


@pytest.mark.parametrize('batch,cin', [(4, 1), (130, 32)])
def test_conv_per_task_gradients_of_shared_activations(batch, cin):
  """A vmap over the cotangents of one pullback (multi-task per-task
  gradients): the weight gradient folds the tasks into its output channels
  (im2col for few input channels, the chunked XLA conv for many)."""
  x, k = _normal(0, (batch, 6, 6, cin)), _normal(1, (3, 3, cin, 5))
  fast = _fast_conv()

  def losses(k):
    y = fast(x, k)
    return jnp.stack([jnp.sum(jnp.tanh(y)), jnp.sum(y[..., :2] ** 2),
                      jnp.sum(jnp.sin(y))])

  @jax.jit
  def run(k):
    _, pullback = jax.vjp(losses, k)
    per_task = jax.vmap(pullback)(jnp.eye(3))[0]
    looped = [jax.grad(lambda k, t=t: losses(k)[t])(k) for t in range(3)]
    return per_task, looped

  per_task, looped = run(k)
  for t in range(3):
    _assert_close(per_task[t], looped[t])


def test_conv_vmap_of_second_order_gradient():
  tasks = 2
  xs, ks = _normal(0, (tasks, 3, 5, 5, 4)), _normal(1, (tasks, 3, 3, 4, 3))

  def meta_grad(conv):
    def f(x, k):
      gk = jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k))))(k)
      return jnp.sum(jnp.sin(conv(x, k - 0.5 * gk)))
    return jax.vmap(jax.grad(f, 1))

  got, want = jax.jit(lambda xs, ks: (
      meta_grad(_fast_conv())(xs, ks), meta_grad(_plain_conv)(xs, ks)))(xs, ks)
  _assert_close(got, want, tol=2e-4)


def test_conv_impls_agree_and_jit():
  x, k = _normal(0, (2, 6, 6, 8)), _normal(1, (3, 3, 8, 4))
  outs = jax.jit(lambda x, k: [_plain_conv(x, k)] + [
      conv2d(x, k, impl=i) for i in conv_lib.IMPLS])(x, k)
  for out in outs[1:]:
    _assert_close(out, outs[0])


def test_conv_rejects_bad_arguments():
  x, k = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 1))
  with pytest.raises(ValueError, match='channels'):
    conv2d(x, jnp.zeros((3, 3, 3, 1)))
  with pytest.raises(ValueError, match='padding'):
    conv2d(x, k, padding='FULL')
  with pytest.raises(ValueError, match='impl'):
    conv2d(x, k, impl='gpu')
  with pytest.raises(ValueError, match='fast path'):
    conv2d(x, k, padding=((3, 0), (0, 0)), impl='cpu')


@pytest.mark.parametrize('shape', [(3, 8, 8, 5), (2, 7, 9, 3), (2, 2, 3, 4)])
def test_max_pool_matches_flax_including_ties(shape):
  x = _normal(0, shape)
  g = _normal(1, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

  @jax.jit
  def run(inputs, g):
    (y, vjp), (y_ref, vjp_ref) = (jax.vjp(max_pool_2x2, inputs),
                                  jax.vjp(_plain_pool, inputs))
    return (y, vjp(g)[0]), (y_ref, vjp_ref(g)[0])

  # ReLU of rounded values: many windows whose maximum is tied.
  for inputs in (x, jax.nn.relu(jnp.round(x))):
    got, want = run(inputs, g)
    for a, e in zip(got, want):
      np.testing.assert_array_equal(a, e)


def test_max_pool_second_order_and_finite_differences():
  x, k = _normal(0, (2, 6, 6, 3)), _normal(1, (3, 3, 3, 3))

  def f(pool):
    def inner(k):
      return jnp.sum(pool(jnp.tanh(_plain_conv(x, k))) ** 2)
    return jax.grad(lambda k: jnp.sum(jnp.sin(jax.grad(inner)(k))))

  got, want = jax.jit(lambda k: (f(max_pool_2x2)(k), f(_plain_pool)(k)))(k)
  _assert_close(got, want)
  with jax.enable_x64(True):
    # Distinct values keep every window's maximum away from a tie.
    xs = np.random.default_rng(2).permutation(2 * 5 * 4 * 3).reshape(2, 5, 4, 3)
    xs = jnp.asarray(xs / 7.0, jnp.float64)
    check_grads(lambda v: max_pool_2x2(v) ** 2, (xs,), order=2,
                modes=('rev',))


def test_max_pool_vmap_and_jit():
  xs = _normal(0, (3, 2, 6, 5, 4))
  g = _normal(1, (3, 2, 3, 2, 4))
  got, want = jax.jit(lambda xs, g: (
      jax.vmap(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0])(xs, g),
      [jax.vjp(_plain_pool, xs[t])[1](g[t])[0] for t in range(3)]))(xs, g)
  for t in range(3):
    np.testing.assert_array_equal(got[t], want[t])


def test_max_pool_rejects_bad_shapes():
  with pytest.raises(ValueError, match='expects'):
    max_pool_2x2(jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match='at least 2x2'):
    max_pool_2x2(jnp.zeros((1, 1, 4, 3)))


# --- depthwise convolution ----------------------------------------------------

_DEPTHWISE_CASES = [  # (H, W, C, k, stride, pads)
    (9, 9, 3, 3, 1, ((1, 1), (1, 1))),
    (10, 7, 4, 3, 2, ((0, 1), (1, 1))),
    (11, 11, 2, 5, 2, ((1, 2), (2, 2))),
    (8, 8, 5, 5, 1, ((2, 2), (0, 0))),
    (7, 9, 3, 3, 2, ((0, 0), (0, 0))),  # rows/columns no window reaches
]


def _lax_depthwise(x, w, stride, pads):
  return lax.conv_general_dilated(
      x, w, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


@pytest.mark.parametrize('case', _DEPTHWISE_CASES)
def test_depthwise_values_and_gradients_match_lax(case):
  h, w_, c, k, stride, pads = case
  rng = np.random.default_rng(sum(case[:5]))
  x = jnp.asarray(rng.normal(size=(2, h, w_, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
  ours = lambda x, w: depthwise_conv2d(x, w, strides=stride, padding=pads,
                                       impl='cpu')
  theirs = lambda x, w: _lax_depthwise(x, w, stride, pads)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))

  def values_and_grads(f):
    # One compiled program per implementation (eagerly, every op of the
    # three passes compiled on its own).
    def run(x, w):
      # Second order: the gradient of a gradient norm.
      second = jax.grad(lambda w: jnp.sum(jax.grad(loss(f))(x, w) ** 2))(w)
      return f(x, w), jax.grad(loss(f), (0, 1))(x, w), second
    return jax.jit(run)(x, w)

  (y, grads, second), (y_ref, grads_ref, second_ref) = map(
      values_and_grads, (ours, theirs))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(second, second_ref, rtol=1e-3, atol=1e-3)


def test_depthwise_rejects_bad_arguments():
  with pytest.raises(ValueError, match='channels differ'):
    depthwise_conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 2)),
                     padding=((1, 1), (1, 1)))
  with pytest.raises(ValueError, match='non-negative'):
    depthwise_conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)),
                     padding=((-1, 1), (1, 1)))
