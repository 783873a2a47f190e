"""Transfer throughput: feature extraction (images/s) per backbone, and
linear-probe evaluation episodes/s over 600 test episodes in one compiled call.

Prints one JSON line per figure. Run from the repo root:

  python benchmarks/transfer.py
  python benchmarks/transfer.py --backbones efficientnet_lite0:224 --images 256

Random weights and random images: throughput does not depend on them
(`--weights imagenet` uses the converted EfficientNet-Lite0 weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones
from fewshot import features
from fewshot.algorithms import linear_probe, protonet
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators import episode_accuracies
from fewshot.ops import tune_cpu

# name:input_size -> (create options, stored image shape)
BACKBONES = {
    'conv4:28': (dict(name='conv4', norm='batch_running'), (28, 28, 1)),
    'conv4:84': (dict(name='conv4', norm='batch_running'), (84, 84, 3)),
    'resnet12_w16:32': (dict(name='resnet12', widths=(16, 40, 80, 160)),
                        (32, 32, 3)),
    'resnet12:84': (dict(name='resnet12'), (84, 84, 3)),
    'resnet18:32': (dict(name='resnet18', small_images=True), (32, 32, 3)),
    'efficientnet_lite0:128': (dict(name='efficientnet_lite0',
                                    input_size=128), (64, 64, 3)),
    'efficientnet_lite0:224': (dict(name='efficientnet_lite0',
                                    input_size=224), (64, 64, 3)),
}
DEFAULT = ('conv4:28', 'resnet12_w16:32', 'resnet12:84', 'resnet18:32',
           'efficientnet_lite0:128', 'efficientnet_lite0:224')


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 3),
                    'unit': unit, **settings}), flush=True)


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--backbones', default=','.join(DEFAULT),
                      help=f'comma-separated, from {sorted(BACKBONES)}')
  parser.add_argument('--images', type=int, default=512,
                      help='images per timed feature-extraction call')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--episodes', type=int, default=600)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  tune_cpu()
  machine = dict(backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind,
                 cpus=os.cpu_count(), host=platform.machine(),
                 xla_flags=os.environ.get('XLA_FLAGS', ''))
  rng = np.random.default_rng(0)

  for key in args.backbones.split(','):
    options, shape = BACKBONES[key]
    options = dict(options)
    backbone = backbones.create(options.pop('name'), **options)
    images = jnp.asarray(rng.integers(0, 256, (args.images, *shape)),
                         jnp.uint8)
    params, state = jax.jit(backbone.init)(jax.random.key(0), images[:2])
    extract = jax.jit(lambda x, p=params, s=state, b=backbone:
                      features.extract_features(b, p, s, x,
                                                batch_size=args.batch_size))
    seconds = timed(lambda: extract(images), args.repeats)
    emit('feature_extraction', args.images / seconds, 'images/s',
         backbone=key, stored_shape=list(shape), batch_size=args.batch_size,
         **machine)

  # Linear probes and ProtoNet on stored features (640-d, like ResNet-12's):
  # 600 5-way episodes in one compiled call.
  dim = 640
  splits = synthetic_splits(num_classes=(2, 2, 40), images_per_class=100,
                            image_size=1, channels=1)
  data = sampling.to_device(splits['test'])
  data = data.replace(images=jnp.asarray(
      rng.normal(size=(data.images.shape[0], dim)), jnp.float32))
  identity = backbones.identity_backbone()
  learners = {
      'linear_probe_logistic100': linear_probe(identity, solver='logistic',
                                               steps=100),
      'linear_probe_ridge': linear_probe(identity, solver='ridge'),
      'protonet': protonet(identity),
  }
  for shots in (1, 5):
    spec = sampling.EpisodeSpec(5, shots, 15)
    for name, algorithm in learners.items():
      meta_params, model_state = algorithm.init(jax.random.key(0),
                                                data.images[:2])
      evaluate = jax.jit(episode_accuracies(algorithm, spec, args.episodes))
      seconds = timed(lambda: evaluate(meta_params, model_state, data,
                                       jax.random.key(1)), args.repeats)
      emit('probe_evaluation', args.episodes / seconds, 'episodes/s',
           learner=name, feature_dim=dim, ways=5, shots=shots, queries=15,
           episodes=args.episodes, **machine)


if __name__ == '__main__':
  main()
