"""The collectives of the compiled MAML train step with its tasks on 4 devices."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# In a fresh process (the device count is fixed when JAX starts): the
# harness's step (its mesh, shardings and donation) for a small second-order
# MAML, compiled; prints every collective of the optimised HLO with the
# shapes it returns, and the shapes of the gradient's leaves.
_CHILD = r'''
import json, re, sys
import jax
from jax.sharding import NamedSharding, PartitionSpec
sys.path.insert(0, {repo!r})
from fewshot import backbones, harness
from fewshot.algorithms import maml
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.objectives import episodic, init_state, make_train_step
from fewshot.optimizers import make_optimizer
assert jax.device_count() == 4, jax.devices()
splits = synthetic_splits(num_classes=(10, 2, 2), images_per_class=4,
                          image_size=12, channels=1)
algorithm = maml(backbones.create('conv4', filters=8, num_blocks=2,
                                  norm='batch'),
                 num_ways=3, inner_steps=1, inner_learning_rate=0.4)
objective = episodic(algorithm, ways=3, shots=1, queries=1, meta_batch_size=8)
optimizer = make_optimizer(name='sgd', learning_rate=0.1)
data = sampling.to_device(splits['train'])
mesh = harness.task_mesh()
replicated = NamedSharding(mesh, PartitionSpec())
state = jax.device_put(init_state(objective, optimizer, data, 0), replicated)
data = jax.device_put(data, replicated)
step = jax.jit(make_train_step(objective, optimizer,
                               NamedSharding(mesh, PartitionSpec('data'))),
               donate_argnums=0)
text = step.lower(state, data).compile().as_text()
ops = []
for line in text.splitlines():
  match = re.search(r'= (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter|'
                    r'collective-permute|collective-broadcast)(?:-start)?\(',
                    line)
  if match:
    name = re.search(r'op_name="([^"]*)"', line)
    ops.append([match.group(2),
                re.findall(r'[a-z0-9]+\[[0-9,]*\]', match.group(1)),
                name.group(1) if name else ''])
grads = [f'f32[{{",".join(map(str, leaf.shape))}}]'
         for leaf in jax.tree.leaves(state.params)]
print(json.dumps(dict(ops=ops, grads=grads)))
'''


@pytest.fixture(scope='module')
def collectives():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(f"{os.environ.get('XLA_FLAGS', '')} "
                        '--xla_force_host_platform_device_count=4'))
  child = subprocess.run(
      [sys.executable, '-c', _CHILD.format(repo=str(REPO))], env=env,
      capture_output=True, text=True, timeout=900)
  assert child.returncode == 0, child.stderr[-3000:]
  return json.loads(child.stdout.strip().splitlines()[-1])


def test_the_mean_gradient_is_all_reduced(collectives):
  # Every gradient leaf (the conv kernels are distinct enough to be sure
  # of) is an output of an all-reduce at its own shape: the mean over the
  # tasks, not the per-task gradients.
  reduced = {shape for op, shapes, _ in collectives['ops']
             if op == 'all-reduce' for shape in shapes}
  kernels = [shape for shape in collectives['grads']
             if re.fullmatch(r'f32\[3,3,\d+,8\]', shape)]
  assert len(kernels) == 2, collectives['grads']
  assert set(kernels) <= reduced, collectives['ops']


def test_no_task_moves_between_devices(collectives):
  # Each device adapts to its own 2 of the 8 tasks and differentiates
  # them: no per-task gradient, image or activation is gathered, permuted
  # or exchanged (the partitioner once sent every task's activations to
  # device 0 and back, ~300 collectives), and one all-reduce (the mean
  # gradient, loss and metrics) ends the step. The one all-gather allowed
  # is the sampler's: the partitioner does not split `top_k` over the
  # tasks, so their [T, N, images per class] random scores are gathered.
  moved = [(op, shapes, name) for op, shapes, name in collectives['ops']
           if op != 'all-reduce' and not (op == 'all-gather'
                                           and name.endswith('/top_k'))]
  assert not moved, moved
  all_reduces = [op for op, _, _ in collectives['ops'] if op == 'all-reduce']
  assert len(all_reduces) == 1, collectives['ops']
