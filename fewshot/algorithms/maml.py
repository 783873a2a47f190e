"""MAML and its family: FOMAML, ANIL, Meta-SGD and first-order Proto-MAML.

One implementation, `maml(...)`, covers the family; the named factories set
its options:

* `maml`        second-order meta-gradients through the whole inner loop;
* `fomaml`      `first_order=True`: the inner-loop gradients are constants,
                so the meta-gradient is the query gradient at the adapted
                parameters (Finn et al. 2017, section 5.2);
* `anil`        only the head is adapted in the inner loop; the body is
                trained in the outer loop only (Raghu et al. 2020);
* `metasgd`     per-parameter inner learning rates are meta-parameters
                (Li et al. 2017);
* `proto_maml`  the head starts every episode from the prototypes,
                `W = 2 c_k`, `b = -|c_k|^2`, first order (Triantafillou et
                al. 2020); it has no head meta-parameters, so it runs at any
                number of ways.

The inner loop is `lax.scan` over an optax transformation on the adapted
leaves only; `remat=True` wraps each inner step in `jax.checkpoint`, so the
activations of one step at a time are alive during the second-order
backward pass. Which leaves are adapted in the inner loop (`inner_params`)
and which receive meta-gradients (`outer_params`) are two independent regex
partitions of the parameter paths (`fewshot.transfer.path_mask`: a pattern
matches a whole path or a '/'-bounded prefix of it), e.g. 'backbone/conv0/kernel', 'head/bias'.

BatchNorm in episodes is the backbone's `norm` option: Conv-4's 'batch' is
the MAML paper's transductive per-task batch statistics; 'batch_running'
uses batch statistics while adapting and running averages at evaluation.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from fewshot.algorithms.base import Algorithm
from fewshot.backbones.base import Backbone
from fewshot.heads import (init_head, linear_logits, prototype_head,
                           prototypes, zeros_head)
from fewshot.optimizers import InnerOptimizer, inner_optimizer as make_inner
from fewshot.transfer.masks import path_mask, path_string

HEAD_INITS = ('random', 'zeros', 'prototypes')
MODEL_KEYS = ('backbone', 'head')


def _check_patterns(params: Any, patterns: Sequence[str], what: str) -> None:
  for pattern in patterns:
    mask = path_mask(params, [pattern])
    if not any(jax.tree.leaves(mask)):
      paths = [path_string(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]]
      raise ValueError(f'{what} pattern {pattern!r} matches no parameter; '
                       f'parameter paths are {paths}.')


def _prune(tree: Any) -> Any:
  """Drops None leaves and the dicts they leave empty."""
  if isinstance(tree, dict):
    pruned = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in pruned.items()
            if v is not None and not (isinstance(v, dict) and not v)}
  return tree


def maml(backbone: Backbone, *, num_ways: int | None = None,
         inner_steps: int = 1, inner_learning_rate: float = 0.4,
         eval_inner_steps: int | None = None,
         eval_inner_learning_rate: float | None = None,
         inner_optimizer: InnerOptimizer = 'sgd', first_order: bool = False,
         remat: bool = False, inner_params: Sequence[str] = ('.*',),
         outer_params: Sequence[str] = ('.*',),
         learn_inner_rates: bool = False,
         head_init: str = 'random') -> Algorithm:
  """Model-agnostic meta-learning on a backbone plus a linear head.

  Args:
    backbone: the body, `images -> features [B, D]`.
    num_ways: classes of the meta-learned head (`[D, num_ways]`); required
      unless `head_init='prototypes'`.
    inner_steps: inner-loop steps while meta-training.
    inner_learning_rate: inner-loop learning rate while meta-training (the
      initial value of the learned rates with `learn_inner_rates`).
    eval_inner_steps: inner steps at evaluation (default: `inner_steps`).
    eval_inner_learning_rate: its learning rate (default: the training one;
      ignored with `learn_inner_rates`, which uses the learned rates).
    inner_optimizer: 'sgd', 'momentum', 'adam', or a function
      `learning_rate -> optax.GradientTransformation`.
    first_order: treat inner gradients as constants (FOMAML).
    remat: rematerialise each inner step in the backward pass.
    inner_params: regexes of parameter paths adapted in the inner loop.
    outer_params: regexes of parameter paths that receive meta-gradients;
      the others are held where they were initialised (zero meta-gradient).
    learn_inner_rates: Meta-SGD: one learned rate per adapted parameter.
    head_init: 'random' (learned, uniform +-1/sqrt(D) like torch's Linear),
      'zeros' (learned, starts at zero) or 'prototypes' (Proto-MAML: from
      the support prototypes each episode, not a meta-parameter).

  Returns:
    An `Algorithm` whose task parameters are the adapted
    `{'backbone': ..., 'head': {'kernel': [D, N], 'bias': [N]}}`.
  """
  if head_init not in HEAD_INITS:
    raise ValueError(f'head_init must be one of {HEAD_INITS}, got {head_init!r}.')
  if head_init != 'prototypes' and not num_ways:
    raise ValueError('maml needs num_ways (the size of its meta-learned head) '
                     "unless head_init='prototypes'.")
  if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
    raise ValueError('inner steps must be >= 0.')
  make_inner(inner_optimizer, 1.0, what='inner_optimizer')  # fail early
  train_inner = (inner_steps, inner_learning_rate)
  eval_inner = (inner_steps if eval_inner_steps is None else eval_inner_steps,
                inner_learning_rate if eval_inner_learning_rate is None
                else eval_inner_learning_rate)

  def model_params_of(meta_params):
    return {k: meta_params[k] for k in MODEL_KEYS if k in meta_params}

  def init(key, sample_images):
    backbone_key, head_key = jax.random.split(key)
    params, model_state = backbone.init(backbone_key, sample_images)
    meta_params = {'backbone': params}
    feature_shape = jax.eval_shape(
        lambda: backbone.apply(params, model_state, sample_images, False)[0])
    feature_dim = feature_shape.shape[-1]
    if head_init == 'zeros':
      meta_params['head'] = zeros_head(feature_dim, num_ways)
    elif head_init == 'random':
      meta_params['head'] = init_head(head_key, feature_dim, num_ways)
    model_params = dict(meta_params)
    if head_init == 'prototypes':  # the head exists once an episode is seen
      model_params['head'] = {'kernel': jnp.zeros((feature_dim, 1)),
                              'bias': jnp.zeros((1,))}
    _check_patterns(model_params, inner_params, 'inner_params')
    _check_patterns(model_params, outer_params, 'outer_params')
    if learn_inner_rates:
      mask = path_mask(model_params, inner_params)
      if head_init == 'prototypes':
        raise ValueError('learn_inner_rates needs a meta-learned head; it '
                         "cannot be combined with head_init='prototypes'.")
      meta_params['inner_rates'] = _prune(jax.tree.map(
          lambda leaf, adapted: (jnp.full_like(leaf, inner_learning_rate)
                                 if adapted else None),
          model_params, mask))
    return meta_params, model_state

  def hold_outer(meta_params):
    """Stops meta-gradients to the leaves outside `outer_params`."""
    if tuple(outer_params) == ('.*',):
      return meta_params
    model_params = model_params_of(meta_params)
    mask = path_mask(model_params, outer_params)
    held = jax.tree.map(lambda leaf, trained: leaf if trained
                        else jax.lax.stop_gradient(leaf), model_params, mask)
    return {**meta_params, **held}

  def adapt(meta_params, model_state, episode, key, train):
    del key  # adaptation is deterministic
    steps, learning_rate = train_inner if train else eval_inner
    meta_params = hold_outer(meta_params)
    model_params = model_params_of(meta_params)
    support_images, support_labels = episode.support_images, episode.support_labels
    if head_init == 'prototypes':
      features, model_state = backbone.apply(
          model_params['backbone'], model_state, support_images, train)
      model_params['head'] = prototype_head(
          prototypes(features, support_labels, episode.num_ways))
    elif model_params['head']['bias'].shape[0] != episode.num_ways:
      raise ValueError(
          f'The meta-learned head has {model_params["head"]["bias"].shape[0]} '
          f'ways but the episode has {episode.num_ways}; MAML evaluates at its '
          "training ways (use head_init='prototypes' for any ways).")

    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(
        model_params)
    leaves = [leaf for _, leaf in leaves_with_paths]
    adapted_mask = jax.tree.leaves(path_mask(model_params, inner_params))
    adapted_index = [i for i, adapted in enumerate(adapted_mask) if adapted]
    head_only = all(path_string(leaves_with_paths[i][0]).startswith('head/')
                    for i in adapted_index)

    def rebuild(adapted_leaves):
      merged = list(leaves)
      for i, leaf in zip(adapted_index, adapted_leaves):
        merged[i] = leaf
      return jax.tree.unflatten(treedef, merged)

    if head_only:
      # ANIL: the body is fixed in the inner loop, so its features (and its
      # BatchNorm state update) are computed once.
      support_features, model_state = backbone.apply(
          model_params['backbone'], model_state, support_images, train)

    def inner_loss(adapted_leaves, state):
      params = rebuild(adapted_leaves)
      if head_only:
        features = support_features
      else:
        features, state = backbone.apply(params['backbone'], state,
                                         support_images, train)
      logits = linear_logits(features, params['head'])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, support_labels).mean()
      return loss, state

    if learn_inner_rates:
      optimizer = make_inner(inner_optimizer, 1.0)
      rates = jax.tree.leaves(meta_params['inner_rates'])
    else:
      optimizer = make_inner(inner_optimizer, learning_rate)
      rates = None

    def inner_step(carry, _):
      adapted_leaves, opt_state, state = carry
      (loss, state), grads = jax.value_and_grad(inner_loss, has_aux=True)(
          adapted_leaves, state)
      if first_order:
        grads = jax.lax.stop_gradient(grads)
      updates, opt_state = optimizer.update(grads, opt_state, adapted_leaves)
      if rates is not None:
        updates = [u * r for u, r in zip(updates, rates)]
      adapted_leaves = optax.apply_updates(adapted_leaves, updates)
      return (adapted_leaves, opt_state, state), loss

    if remat:
      inner_step = jax.checkpoint(inner_step)
    initial = [leaves[i] for i in adapted_index]
    (adapted_leaves, _, model_state), _ = jax.lax.scan(
        inner_step, (initial, optimizer.init(initial), model_state),
        length=steps)
    return rebuild(adapted_leaves), model_state

  def predict(meta_params, model_state, task_params, images, train):
    del meta_params  # everything needed was adapted into task_params
    features, model_state = backbone.apply(task_params['backbone'],
                                           model_state, images, train)
    return linear_logits(features, task_params['head']), model_state

  return Algorithm(init=init, adapt=adapt, predict=predict)


def fomaml(backbone: Backbone, **options: Any) -> Algorithm:
  """First-order MAML: `maml(..., first_order=True)`."""
  return maml(backbone, **{'first_order': True, **options})


def anil(backbone: Backbone, **options: Any) -> Algorithm:
  """ANIL: only the head is adapted; `maml(..., inner_params=('head/.*',))`."""
  return maml(backbone, **{'inner_params': ('head/.*',), **options})


def metasgd(backbone: Backbone, **options: Any) -> Algorithm:
  """Meta-SGD: learned per-parameter inner rates; `maml(..., learn_inner_rates=True)`."""
  return maml(backbone, **{'learn_inner_rates': True, **options})


def proto_maml(backbone: Backbone, **options: Any) -> Algorithm:
  """First-order Proto-MAML: the head starts from the support prototypes.

  Gradients still flow into the backbone through the prototype
  initialisation (only the inner-loop gradients are first order).
  """
  return maml(backbone, **{'head_init': 'prototypes', 'first_order': True,
                           **options})


# The variants accept exactly maml's options (for config checking).
for _variant in (fomaml, anil, metasgd, proto_maml):
  _variant.__signature__ = inspect.signature(maml)
del _variant
