"""Transfer baselines: linear probes, SimpleShot, Baseline++, fine-tuning.

Each factory returns an `Algorithm` written for one episode, so it vmaps over
a meta-batch and plugs into `fewshot.evaluators.episode_accuracies` unchanged.
Their meta-parameters hold the backbone's parameters under `'backbone'`, as
ProtoNet's do: put pretrained weights there to evaluate a pretrained backbone.

With `freeze_backbone=True` (the default of the feature-extraction
algorithms) the backbone is a fixed feature extractor: its features pass
through `lax.stop_gradient` and it always runs in evaluation mode, so
BatchNorm uses its running (pretrained) statistics and `model_state` is
never changed.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone, ModelState, Params
from fewshot.heads import (cosine_logits, l2_normalize, linear_logits,
                           prototype_head, prototypes, squared_distances,
                           zeros_head)
from fewshot.optimizers import inner_optimizer
from fewshot.transfer.finetune import fit
from fewshot.transfer.masks import freeze, path_mask
from fewshot.transfer.regularizers import l2sp_penalty
from fewshot.transfer.schedules import (gradual_unfreezing,
                                       layerwise_lr_scales, scale_by_tree)

SOLVERS = ('ridge', 'logistic')
FORMS = ('auto', 'primal', 'dual')
HEAD_INITS = ('zeros', 'prototypes')
CENTERINGS = ('support', 'base', 'none')


def _embed(backbone: Backbone, freeze_backbone: bool, backbone_params: Params,
           model_state: ModelState, images: jax.Array,
           train: bool) -> tuple[jax.Array, ModelState]:
  if freeze_backbone:
    features, _ = backbone.apply(backbone_params, model_state, images, False)
    return jax.lax.stop_gradient(features), model_state
  return backbone.apply(backbone_params, model_state, images, train)


def _init_backbone(backbone: Backbone):
  def init(key, sample_images):
    params, model_state = backbone.init(key, sample_images)
    return {'backbone': params}, model_state
  return init


def _feature_dim(backbone: Backbone, params: Params, model_state: ModelState,
                 sample_images: jax.Array) -> int:
  shape = jax.eval_shape(
      lambda: backbone.apply(params, model_state, sample_images, False)[0])
  return shape.shape[-1]


def ridge_weights(features_BxD: jax.Array, targets_BxN: jax.Array, l2: float,
                  form: str = 'auto') -> jax.Array:
  """`[D, N]` ridge regression weights `argmin ||X W - Y||^2 + l2 ||W||^2`.

  'primal' solves the `[D, D]` system `(X^T X + l2 I) W = X^T Y`; 'dual' the
  `[B, B]` system `(X X^T + l2 I) A = Y` with `W = X^T A` (the same weights,
  by the push-through identity; cheap when B = N*K < D, as in R2D2).
  'auto' picks the smaller system (a trace-time choice: shapes are static).
  """
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}.')
  num_samples, dim = features_BxD.shape
  if form == 'auto':
    form = 'dual' if num_samples < dim else 'primal'
  if form == 'dual':
    gram_BxB = features_BxD @ features_BxD.T
    system = gram_BxB + l2 * jnp.eye(num_samples, dtype=gram_BxB.dtype)
    dual_BxN = jax.scipy.linalg.solve(system, targets_BxN, assume_a='pos')
    return features_BxD.T @ dual_BxN
  covariance_DxD = features_BxD.T @ features_BxD
  system = covariance_DxD + l2 * jnp.eye(dim, dtype=covariance_DxD.dtype)
  return jax.scipy.linalg.solve(system, features_BxD.T @ targets_BxN,
                                assume_a='pos')


def _with_bias_feature(features_BxD: jax.Array) -> jax.Array:
  ones = jnp.ones((features_BxD.shape[0], 1), features_BxD.dtype)
  return jnp.concatenate([features_BxD, ones], axis=-1)


def linear_probe(backbone: Backbone, *, solver: str = 'ridge',
                 l2: float | None = None, steps: int = 100,
                 learning_rate: float = 0.1,
                 optimizer: str | optax.GradientTransformation = 'adam',
                 init: str = 'zeros', normalize: bool = True,
                 form: str = 'auto', init_scale: float = 10.0,
                 freeze_backbone: bool = True) -> Algorithm:
  """A linear classifier fitted to the support features of each episode.

  Args:
    backbone: the feature extractor `images -> features [B, D]`.
    solver: 'ridge' (closed form least squares to one-hot targets, on the
      features plus a constant bias feature; the logits are
      `exp(log_scale) * X W`, with `log_scale` a meta-parameter) or
      'logistic' (softmax regression with a bias, trained for `steps`
      full-batch steps inside a `lax.scan`).
    l2: the ridge penalty `l2 ||W||^2` (default 1.0), or for 'logistic'
      the penalty `l2 / 2 ||W||^2` added to the mean cross-entropy (default
      1e-3; the bias is not penalised).
    steps, learning_rate, optimizer: the logistic solver's loop ('adam',
      'sgd' or 'momentum').
    init: 'zeros' or 'prototypes' (the nearest-prototype classifier) for
      the logistic solver's starting weights.
    normalize: L2-normalise the features first.
    form: the ridge system, 'primal' ([D+1, D+1]), 'dual' ([N*K, N*K]) or
      'auto' (the smaller).
    init_scale: initial ridge logit scale.
    freeze_backbone: stop gradients into the backbone (see module docstring).

  Returns:
    An `Algorithm`; task parameters are the head `{'kernel': [D(+1), N]}`
    (ridge) or `{'kernel': [D, N], 'bias': [N]}` (logistic).
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}.')
  if init not in HEAD_INITS:
    raise ValueError(f'init must be one of {HEAD_INITS}, got {init!r}.')
  if l2 is None:
    l2 = 1.0 if solver == 'ridge' else 1e-3
  inner = inner_optimizer(optimizer, learning_rate)
  init_backbone = _init_backbone(backbone)

  def init_fn(key, sample_images):
    meta_params, model_state = init_backbone(key, sample_images)
    if solver == 'ridge':
      meta_params['log_scale'] = jnp.log(jnp.asarray(init_scale, jnp.float32))
    return meta_params, model_state

  def features(meta_params, model_state, images, train):
    embeddings, model_state = _embed(backbone, freeze_backbone,
                                     meta_params['backbone'], model_state,
                                     images, train)
    if normalize:
      embeddings = l2_normalize(embeddings)
    return embeddings, model_state

  def adapt(meta_params, model_state, episode, key, train):
    del key  # Both solvers are deterministic.
    support, model_state = features(meta_params, model_state,
                                    episode.support_images, train)
    num_ways = episode.num_ways
    if solver == 'ridge':
      targets = jax.nn.one_hot(episode.support_labels, num_ways,
                               dtype=support.dtype)
      kernel = ridge_weights(_with_bias_feature(support), targets, l2, form)
      return {'kernel': kernel}, model_state
    if init == 'prototypes':
      head = prototype_head(prototypes(support, episode.support_labels,
                                       num_ways))
    else:
      head = zeros_head(support.shape[-1], num_ways, support.dtype)

    def loss_fn(head):
      cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
          linear_logits(support, head), episode.support_labels).mean()
      return cross_entropy + 0.5 * l2 * jnp.sum(jnp.square(head['kernel']))

    head, _ = fit(loss_fn, head, inner, steps)
    return head, model_state

  def predict(meta_params, model_state, task_params, images, train):
    queries, model_state = features(meta_params, model_state, images, train)
    if solver == 'ridge':
      logits = jnp.exp(meta_params['log_scale']) * (
          _with_bias_feature(queries) @ task_params['kernel'])
    else:
      logits = linear_logits(queries, task_params)
    return logits, model_state

  return Algorithm(init=init_fn, adapt=adapt, predict=predict)


def feature_mean(backbone: Backbone, backbone_params: Params,
                 model_state: ModelState, images: jax.Array, *,
                 batch_size: int = 256) -> jax.Array:
  """`[D]` mean feature of `images [M, H, W, C]` (e.g. all base-class images).

  Runs the backbone in evaluation mode over batches with `lax.map`; a final
  partial batch is padded and left out of the mean. Jit it at the call site.
  """
  num_images = images.shape[0]
  batch_size = min(batch_size, num_images)
  num_batches = -(-num_images // batch_size)
  padding = num_batches * batch_size - num_images
  padded = jnp.concatenate(
      [images, jnp.zeros((padding,) + images.shape[1:], images.dtype)])
  batches = padded.reshape((num_batches, batch_size) + images.shape[1:])
  valid = (jnp.arange(num_batches * batch_size) < num_images).reshape(
      num_batches, batch_size)

  def batch_sum(args):
    batch, batch_valid = args
    embeddings, _ = backbone.apply(backbone_params, model_state, batch, False)
    return jnp.sum(jnp.where(batch_valid[:, None], embeddings, 0.0), axis=0)

  sums = jax.lax.map(batch_sum, (batches, valid))
  return jnp.sum(sums, axis=0) / num_images


def simpleshot(backbone: Backbone, *, centering: str = 'support',
               base_mean: jax.typing.ArrayLike | None = None,
               freeze_backbone: bool = True) -> Algorithm:
  """SimpleShot's CL2N nearest-centroid classifier (Wang et al. 2019).

  Features are centred (minus a mean feature), L2-normalised, and each query
  goes to the nearest class centroid of the normalised support features;
  logits are negative squared Euclidean distances.

  Args:
    backbone: the feature extractor.
    centering: 'support' (the mean support feature of the episode), 'base'
      (the mean feature of the base (training) classes, kept in
      `meta_params['base_mean']`; compute it with `feature_mean`), or 'none'
      (the UN variant; L2 normalisation only).
    base_mean: `[D]` initial `meta_params['base_mean']` for 'base' (zeros
      if None: then set it before evaluating).
    freeze_backbone: stop gradients into the backbone (see module docstring).

  Returns:
    An `Algorithm`; task parameters are `{'prototypes': [N, D],
    'mean': [D]}`.
  """
  if centering not in CENTERINGS:
    raise ValueError(f'centering must be one of {CENTERINGS}, got '
                     f'{centering!r}.')

  def init(key, sample_images):
    params, model_state = backbone.init(key, sample_images)
    meta_params = {'backbone': params}
    if centering == 'base':
      dim = _feature_dim(backbone, params, model_state, sample_images)
      meta_params['base_mean'] = (
          jnp.zeros((dim,), jnp.float32) if base_mean is None
          else jnp.asarray(base_mean, jnp.float32).reshape(dim))
    return meta_params, model_state

  def transform(features_BxD, mean_D):
    return l2_normalize(features_BxD - mean_D[None, :])

  def adapt(meta_params, model_state, episode, key, train):
    del key  # Deterministic.
    support, model_state = _embed(backbone, freeze_backbone,
                                  meta_params['backbone'], model_state,
                                  episode.support_images, train)
    if centering == 'support':
      mean = jnp.mean(support, axis=0)
    elif centering == 'base':
      mean = meta_params['base_mean']
    else:
      mean = jnp.zeros(support.shape[-1:], support.dtype)
    protos = prototypes(transform(support, mean), episode.support_labels,
                        episode.num_ways)
    return {'prototypes': protos, 'mean': mean}, model_state

  def predict(meta_params, model_state, task_params, images, train):
    queries, model_state = _embed(backbone, freeze_backbone,
                                  meta_params['backbone'], model_state,
                                  images, train)
    logits = -squared_distances(transform(queries, task_params['mean']),
                                task_params['prototypes'])
    return logits, model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)


def baseline_pp(backbone: Backbone, *, scale: float = 10.0, steps: int = 50,
                learning_rate: float = 0.01,
                optimizer: str | optax.GradientTransformation = 'adam',
                freeze_backbone: bool = True) -> Algorithm:
  """Baseline++: a cosine classifier tuned on the support set (Chen 2019).

  Class weights start at the normalised class prototypes and are trained on
  the support cross-entropy for `steps` full-batch steps of a `lax.scan`.
  The logits depend on the features only through their directions, so they
  are invariant to the features' scale.

  Args:
    backbone: the feature extractor.
    scale: the cosine temperature.
    steps, learning_rate, optimizer: the fine-tuning loop ('adam', 'sgd' or
      'momentum').
    freeze_backbone: stop gradients into the backbone (see module docstring).

  Returns:
    An `Algorithm`; task parameters are `{'kernel': [D, N]}`.
  """
  inner = inner_optimizer(optimizer, learning_rate)

  def adapt(meta_params, model_state, episode, key, train):
    del key  # Deterministic.
    support, model_state = _embed(backbone, freeze_backbone,
                                  meta_params['backbone'], model_state,
                                  episode.support_images, train)
    protos = prototypes(l2_normalize(support), episode.support_labels,
                        episode.num_ways)
    head = {'kernel': l2_normalize(protos).T}

    def loss_fn(head):
      return optax.softmax_cross_entropy_with_integer_labels(
          cosine_logits(support, head['kernel'], scale),
          episode.support_labels).mean()

    head, _ = fit(loss_fn, head, inner, steps)
    return head, model_state

  def predict(meta_params, model_state, task_params, images, train):
    queries, model_state = _embed(backbone, freeze_backbone,
                                  meta_params['backbone'], model_state,
                                  images, train)
    return cosine_logits(queries, task_params['kernel'], scale), model_state

  return Algorithm(init=_init_backbone(backbone), adapt=adapt, predict=predict)


def fine_tune(backbone: Backbone, *, steps: int = 20,
              learning_rate: float = 1e-3, head_learning_rate: float = 1e-2,
              optimizer: str | optax.GradientTransformation = 'adam',
              trainable: Sequence[str] = ('.*',),
              layers: Sequence[str | Sequence[str]] | None = None,
              layer_decay: float = 1.0,
              unfreeze: Sequence[tuple[int, Sequence[str]]] | None = None,
              l2sp: float = 0.0, head_l2: float = 0.0,
              head_init: str = 'prototypes', normalize: bool = True,
              meta_gradient: bool = False) -> Algorithm:
  """Fine-tunes the backbone and a new linear head on each support set.

  The parameters `{'backbone': ..., 'head': {'kernel': [D, N], 'bias': [N]}}`
  are trained for `steps` full-batch steps (a `lax.scan`) on the support
  cross-entropy plus L2-SP (`l2sp / 2 ||backbone - pretrained||^2`) and
  L2 on the head kernel (`head_l2 / 2 ||kernel||^2`), added as loss terms.
  The backbone runs in evaluation mode throughout: BatchNorm with running
  averages keeps the pretrained statistics (the tiny support batch never
  updates them; transductive BatchNorm uses each batch's own), and
  `model_state` never changes. Compare with
  `linear_probe(solver='logistic')`, which trains the head alone.

  Args:
    backbone: the pretrained feature extractor (`meta_params['backbone']`).
    steps: fine-tuning steps per episode.
    learning_rate: the backbone's learning rate (of its top layer group when
      `layers` is given).
    head_learning_rate: the head's learning rate.
    optimizer: 'adam', 'sgd' or 'momentum', or an optax transformation (its
      own rate then replaces `learning_rate`; the head still moves
      `head_learning_rate / learning_rate` times faster).
    trainable: path patterns (`fewshot.transfer.path_mask`, on paths like
      'backbone/conv3/kernel' and 'head/kernel') of the leaves to train;
      the rest stay bit-identical. `('head',)` is a logistic probe on frozen
      features.
    layers: optional backbone layer patterns from input to output (relative
      to the backbone params, e.g. `['(conv|norm)0', ..., '(conv|norm)3']`
      for Conv-4) for discriminative learning rates: the group `i` levels
      below the top trains at `learning_rate * layer_decay ** i`.
    layer_decay: the ratio between neighbouring layer groups.
    unfreeze: optional gradual unfreezing (`fewshot.transfer.
      gradual_unfreezing`): `(start_step, patterns)` stages over the same
      paths, e.g. `[(0, ['head']), (10, ['head', 'backbone/top.*']),
      (20, ['.*'])]` trains the head alone for 10 steps, then adds the top
      block, then everything. Leaves outside `trainable` never train.
    l2sp: L2-SP strength toward the pretrained backbone.
    head_l2: L2 strength on the head kernel.
    head_init: 'prototypes' (the nearest-prototype classifier) or 'zeros'.
    normalize: L2-normalise the features before the head.
    meta_gradient: let outer-loop gradients flow through the fine-tuning
      (second order, costly); False stops them at the pretrained weights.

  Returns:
    An `Algorithm`; task parameters are the fine-tuned `{'backbone',
    'head'}`.
  """
  if head_init not in HEAD_INITS:
    raise ValueError(f'head_init must be one of {HEAD_INITS}, got '
                     f'{head_init!r}.')
  trainable = tuple(trainable)
  if unfreeze is not None:
    unfreeze = tuple((int(start), tuple(patterns))
                     for start, patterns in unfreeze)
    if not unfreeze or unfreeze[0][0] != 0:
      raise ValueError('unfreeze must start with a stage at step 0 (the '
                       f'leaves trained first), got {unfreeze}.')

  def features(backbone_params, model_state, images):
    embeddings, _ = backbone.apply(backbone_params, model_state, images, False)
    return l2_normalize(embeddings) if normalize else embeddings

  def make_optimizer(params):
    if layers is not None:
      backbone_scales = layerwise_lr_scales(params['backbone'], layers,
                                            decay=layer_decay)
    else:
      backbone_scales = jax.tree.map(lambda _: 1.0, params['backbone'])
    scales = {'backbone': backbone_scales,
              'head': jax.tree.map(lambda _: head_learning_rate /
                                   learning_rate, params['head'])}
    tx = optax.chain(inner_optimizer(optimizer, learning_rate),
                     scale_by_tree(scales))
    tx = freeze(tx, path_mask(params, trainable))
    return tx if unfreeze is None else gradual_unfreezing(unfreeze, tx)

  def adapt(meta_params, model_state, episode, key, train):
    del key, train  # Deterministic; BatchNorm stays in evaluation mode.
    pretrained = meta_params['backbone']
    if not meta_gradient:
      pretrained = jax.lax.stop_gradient(pretrained)
    support = features(pretrained, model_state, episode.support_images)
    if head_init == 'prototypes':
      head = prototype_head(prototypes(support, episode.support_labels,
                                       episode.num_ways))
    else:
      head = zeros_head(support.shape[-1], episode.num_ways, support.dtype)
    params = {'backbone': pretrained, 'head': head}
    reference = {'backbone': pretrained,
                 'head': jax.tree.map(jnp.zeros_like, head)}
    strengths = {'backbone': jax.tree.map(lambda _: l2sp, pretrained),
                 'head': {'kernel': head_l2, 'bias': 0.0}}

    def loss_fn(params):
      logits = linear_logits(
          features(params['backbone'], model_state, episode.support_images),
          params['head'])
      cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
          logits, episode.support_labels).mean()
      return cross_entropy + l2sp_penalty(params, reference, strengths)

    stages = None
    if unfreeze is not None:
      trainable_mask = path_mask(params, trainable)
      stages = [(start, jax.tree.map(
          lambda a, b: a and b, path_mask(params, patterns), trainable_mask))
                for start, patterns in unfreeze]
    params, _ = fit(loss_fn, params, make_optimizer(params), steps,
                    stages=stages)
    return params, model_state

  def predict(meta_params, model_state, task_params, images, train):
    del meta_params, train
    logits = linear_logits(features(task_params['backbone'], model_state,
                                    images), task_params['head'])
    return logits, model_state

  return Algorithm(init=_init_backbone(backbone), adapt=adapt, predict=predict)


__all__ = ['baseline_pp', 'feature_mean', 'fine_tune', 'linear_probe',
           'ridge_weights', 'simpleshot']
