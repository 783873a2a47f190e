"""Intermediate features by module path, and FitNets' hint loss.

`apply_capturing(module, variables, images, train, paths)` runs a flax
backbone module once and returns its output, the outputs of the submodules
at `paths` ('layer3', or 'layer3/conv1': names joined by '/', as in the
parameter tree) and its updated state. FitNets (Romero et al. 2015)
matches a student feature to a teacher's through a learned 1x1 projection
(`init_projection`, `hint_loss`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewshot.heads import init_head, linear_logits


def apply_capturing(module: nn.Module, variables: dict[str, Any],
                    images: jax.Array, train: bool, paths: Sequence[str]
                    ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """`(output, {path: submodule output}, new state collections)`.

  Raises a ValueError naming the module's submodules when a path matches
  none of them.
  """
  wanted = set(paths)

  def keep(submodule, method_name):
    return method_name == '__call__' and '/'.join(submodule.path) in wanted

  state = [k for k in variables if k != 'params']
  mutable = ['intermediates'] + (state if train else [])
  output, updates = module.apply(variables, images, train=train,
                                 capture_intermediates=keep, mutable=mutable)
  updates = dict(updates)
  captured_tree = updates.pop('intermediates', {})
  captured = {}
  for path in paths:
    node = captured_tree
    for part in path.split('/'):
      node = node.get(part, {}) if isinstance(node, dict) else {}
    if '__call__' not in node:
      raise ValueError(f'No submodule {path!r} in {type(module).__name__}; '
                       f'its submodules are {submodule_paths(variables)}.')
    captured[path] = node['__call__'][0]
  new_state = {k: updates[k] for k in state if k in updates} if train else {
      k: variables[k] for k in state}
  return output, captured, new_state


def submodule_paths(variables: dict[str, Any]) -> list[str]:
  """The '/'-joined paths of every parameterised submodule."""
  found = set()

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        found.add('/'.join(prefix + [key]))
        walk(value, prefix + [key])

  walk(dict(variables.get('params', {})), [])
  return sorted(found)


def match_spatial(student: jax.Array, teacher: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Average-pools the larger of two `[B, H, W, C]` maps to the other's
  size (the sizes must divide); `[B, D]` features pass through."""
  if student.ndim != teacher.ndim:
    raise ValueError(f'Student feature {student.shape} and teacher feature '
                     f'{teacher.shape} have different ranks.')
  if student.ndim == 2:
    return student, teacher

  def pool(x, size):
    factor = x.shape[1] // size[0], x.shape[2] // size[1]
    if (x.shape[1] % size[0], x.shape[2] % size[1]) != (0, 0):
      raise ValueError(f'Feature maps {student.shape[1:3]} (student) and '
                       f'{teacher.shape[1:3]} (teacher) do not divide.')
    return nn.avg_pool(x, factor, factor)

  s_size, t_size = student.shape[1:3], teacher.shape[1:3]
  if s_size[0] > t_size[0] or s_size[1] > t_size[1]:
    student = pool(student, t_size)
  elif t_size != s_size:
    teacher = pool(teacher, s_size)
  return student, teacher


def init_projection(key: jax.Array, student_channels: int,
                    teacher_channels: int) -> dict[str, jax.Array]:
  """FitNets' regressor: a 1x1 convolution (a linear map of channels)."""
  return init_head(key, student_channels, teacher_channels)


def hint_loss(projection: dict[str, jax.Array], student: jax.Array,
              teacher: jax.Array) -> jax.Array:
  """Mean squared error of the projected student feature against the
  teacher's (no gradient to the teacher), after `match_spatial`."""
  student, teacher = match_spatial(student, jax.lax.stop_gradient(teacher))
  shape = student.shape
  projected = linear_logits(student.reshape(-1, shape[-1]), projection)
  return jnp.mean(jnp.square(projected.reshape(*shape[:-1], -1) - teacher))


__all__ = ['apply_capturing', 'hint_loss', 'init_projection',
           'match_spatial', 'submodule_paths']
