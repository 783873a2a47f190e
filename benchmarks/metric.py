"""Metric learning speed: loss + gradient per batch beside
pytorch-metric-learning, training images/s per loss, retrieval time.

Prints one JSON line per figure. Run from the repo root, alone on the
machine:

  python benchmarks/metric.py                  # all figures
  python benchmarks/metric.py --skip_training --skip_retrieval   # losses only

Loss figures: the same embeddings `[B=128, D=128]` (P=32 x K=4 labels) and
loss parameters (1,000 classes), value and gradient with respect to both,
compiled once (JAX) against eager and, where it compiles, `torch.compile`d
PyTorch (the faster is reported). Training: Conv-4 on 28x28 images, P=32 x
K=4, the full compiled step (sampling, augmentation, forward, loss,
backward, Adam). Retrieval: Conv-4 embeddings and exact neighbours of
13,180 images (659 classes x 20, the Omniglot evaluation split's size).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewshot import backbones, metric
from fewshot.config_args import METRIC_RECIPES
from fewshot.data import sampling
from fewshot.data.synthetic import synthetic_splits
from fewshot.metric.retrieval import retrieval_metrics
from fewshot.features import extract_features
from fewshot.objectives import init_state, make_train_step
from fewshot.objectives.metric import metric as metric_objective
from fewshot.ops import tune_cpu
from fewshot.optimizers import make_optimizer

P, K, D, C = 32, 4, 128, 1000


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 4),
                    'unit': unit, **settings}), flush=True)


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    jax.block_until_ready(result)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _loss(name):
  loss_options, miner, miner_options = METRIC_RECIPES[name]
  return metric.metric_loss(name, miner=miner, miner_options=miner_options,
                            **loss_options)


def _torch_loss(name, params):
  """pytorch-metric-learning's loss (and miner) with the same settings."""
  from pytorch_metric_learning import losses, miners  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  loss_options, miner, miner_options = METRIC_RECIPES[name]
  miner_fn = None
  if name == 'contrastive':
    loss = losses.ContrastiveLoss(**loss_options)
  elif name == 'triplet':
    loss = losses.TripletMarginLoss(**loss_options)
  elif name == 'multi_similarity':
    loss = losses.MultiSimilarityLoss(**loss_options)
  elif name == 'ntxent':
    loss = losses.NTXentLoss(**loss_options)
  elif name == 'supcon':
    loss = losses.SupConLoss(**loss_options)
  elif name == 'proxy_nca':
    loss = losses.ProxyNCALoss(C, D, **loss_options)
  elif name == 'proxy_anchor':
    loss = losses.ProxyAnchorLoss(C, D, **loss_options)
  elif name == 'normface':
    loss = losses.NormalizedSoftmaxLoss(C, D, **loss_options)
  elif name == 'cosface':
    loss = losses.CosFaceLoss(C, D, **loss_options)
  elif name == 'arcface':
    loss = losses.ArcFaceLoss(C, D, **loss_options)
  elif name == 'subcenter_arcface':
    loss = losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
                                       **loss_options)
  else:
    raise ValueError(name)
  if miner == 'semihard':
    miner_fn = miners.TripletMarginMiner(type_of_triplets='semihard',
                                         **miner_options)
  elif miner == 'multi_similarity':
    miner_fn = miners.MultiSimilarityMiner(**miner_options)
  for attribute in ('proxies', 'W'):
    if hasattr(loss, attribute):
      getattr(loss, attribute).data = torch.tensor(
          np.asarray(next(iter(params.values()))))
  return loss, miner_fn


def bench_losses(repeats: int, with_torch: bool) -> None:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(P * K, D)).astype(np.float32)
  y = np.repeat(rng.choice(C, P, replace=False), K).astype(np.int32)
  for name in sorted(metric.LOSSES):
    loss = _loss(name)
    params = loss.init(jax.random.key(0), C, D)
    step = jax.jit(jax.value_and_grad(loss.apply, argnums=(0, 1)))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    jax.block_until_ready(step(params, xj, yj))
    ours = median_seconds(lambda: step(params, xj, yj), repeats)
    emit('loss_and_grad_ms', 1e3 * ours, 'ms', loss=loss.name, batch=P * K,
         dim=D, classes=C, framework='jax')
    if not with_torch:
      continue
    import torch  # pylint: disable=g-import-not-at-top
    torch_loss, miner = _torch_loss(name, params)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, dtype=torch.long)

    def torch_step(fn):
      def run():
        xt.grad = None
        for p in torch_loss.parameters():
          p.grad = None
        mined = miner(xt, yt) if miner is not None else None
        value = fn(xt, yt, mined)
        value.backward()
        return value.detach()
      return run

    timings = {}
    for mode, fn in (('eager', torch_loss),
                     ('compiled', torch.compile(torch_loss))):
      try:
        run = torch_step(fn)
        for _ in range(3):
          run()
        timings[mode] = float(np.median([_timed(run) for _ in range(repeats)]))
      except Exception as e:  # pylint: disable=broad-except
        emit('torch_compile_failed', 0, '', loss=loss.name, error=str(e)[:80])
    mode = min(timings, key=timings.get)
    emit('loss_and_grad_ms', 1e3 * timings[mode], 'ms', loss=loss.name,
         batch=P * K, dim=D, classes=C, framework=f'pytorch-metric-learning '
         f'({mode})', torch_threads=torch.get_num_threads())
    emit('loss_and_grad_speedup', timings[mode] / ours, 'x', loss=loss.name,
         vs=f'pytorch-metric-learning ({mode})')


def _timed(run):
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def bench_training(steps: int, losses) -> None:
  splits = synthetic_splits(num_classes=(200, 10, 10), images_per_class=20,
                            image_size=28, channels=1)
  data = jax.device_put(sampling.index_by_class(splits['train']))
  backbone = backbones.create('conv4', filters=64, norm='batch_running')
  for name in losses:
    loss_options, miner, miner_options = METRIC_RECIPES[name]
    objective = metric_objective(
        backbone, num_classes=200, loss=name, classes_per_batch=P,
        images_per_class=K, loss_options=loss_options, miner=miner,
        miner_options=miner_options,
        augment=dict(crop_padding=2, pad_mode='edge'))
    optimizer = make_optimizer(name='adam', learning_rate=1e-3)
    state = init_state(objective, optimizer, data, 0)
    step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
    state, _ = step(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    emit('train_images_per_second', P * K / seconds, 'images/s',
         loss=objective and name, miner=miner, backbone='conv4', image=28,
         batch=f'{P}x{K}', step_ms=round(1e3 * seconds, 2))


def bench_retrieval(repeats: int) -> None:
  splits = synthetic_splits(num_classes=(10, 10, 659), images_per_class=20,
                            image_size=28, channels=1)
  test = splits['test']
  backbone = backbones.create('conv4', filters=64, norm='batch_running')
  params, model_state = backbone.init(jax.random.key(0),
                                      jnp.asarray(test.images[:2]))
  embed = jax.jit(lambda images: extract_features(backbone, params,
                                                  model_state, images))
  images = jnp.asarray(test.images)

  def run():
    return retrieval_metrics(embed(images), test.labels)

  run()
  seconds = median_seconds(run, repeats)
  emit('retrieval_seconds', seconds, 's', images=len(test.labels),
       classes=659, backbone='conv4', includes='embedding + exact kNN + '
       'metrics')


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--train_steps', type=int, default=30)
  parser.add_argument('--skip_training', action='store_true')
  parser.add_argument('--skip_retrieval', action='store_true')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--train_losses', default='triplet,multi_similarity,'
                      'supcon,proxy_anchor,arcface')
  args = parser.parse_args()
  tune_cpu()
  emit('machine', 0, '', cpu=platform.processor() or platform.machine(),
       devices=str(jax.devices()), jax=jax.__version__)
  bench_losses(args.repeats, not args.no_torch)
  if not args.skip_training:
    bench_training(args.train_steps, args.train_losses.split(','))
  if not args.skip_retrieval:
    bench_retrieval(max(3, args.repeats // 5))


if __name__ == '__main__':
  main()
