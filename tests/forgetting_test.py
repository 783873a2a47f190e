"""The forgetting report: target accuracy and the source accuracy a fixed
source head keeps after each adaptation method, on generated data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot import peft
from fewshot.data.synthetic import synthetic_splits
from fewshot.evaluators.forgetting import forgetting_report, rows_as_dicts


def test_rows_report_counts_accuracies_and_forgetting():
  splits = synthetic_splits(num_classes=(4, 3, 3), images_per_class=6,
                            image_size=16, channels=1)
  source, target = splits['train'], splits['test']
  pretrained = backbones.load('conv4', sample_images=source.images[:2],
                              filters=8, num_blocks=2, norm='batch_running')
  backbone = pretrained.backbone
  # A fixed source head: the nearest-class-mean classifier of the source.
  features = np.asarray(pretrained.module.apply(pretrained.variables,
                                                source.images))
  means = np.stack([features[source.labels == c].mean(0) for c in range(4)])
  head = {'kernel': jnp.asarray(2 * means.T),
          'bias': jnp.asarray(-(means ** 2).sum(1))}
  labelled = target.select_classes([0, 1, 2])
  keep = np.concatenate([np.flatnonzero(labelled.labels == c)[:2]
                         for c in range(3)])
  support = labelled.__class__(labelled.images[keep], labelled.labels[keep],
                               labelled.class_names)
  lora = functools.partial(peft.peft_backbone,
                           rules=peft.lora_rules(['conv1'], rank=2))
  rows = forgetting_report(
      backbone, head, source.images, source.labels, support, labelled,
      {'probe': None, 'full': lambda b: b, 'lora': lora}, steps=5,
      learning_rate=1e-2, batch_size=7)
  by_name = {row.method: row for row in rows}
  expected_before = np.mean(np.argmax(features @ np.asarray(head['kernel'])
                                      + np.asarray(head['bias']), 1)
                            == source.labels)
  for row in rows:
    assert row.source_before == pytest.approx(expected_before)
    assert 0 <= row.target_accuracy <= 1 and row.target_ci95 >= 0
  # The frozen probe changes no backbone weight: nothing is forgotten.
  assert by_name['probe'].forgetting == 0
  assert by_name['probe'].trainable_parameters == 0
  total = sum(x.size for x in jax.tree.leaves(pretrained.params))
  assert by_name['full'].trainable_parameters == total
  # LoRA on conv1's 3x3x8x8 kernel at rank 2: 2 * (72 + 8) factors.
  assert by_name['lora'].trainable_parameters == 2 * (72 + 8)
  assert by_name['lora'].total_parameters == total + 2 * (72 + 8)
  # Full fine-tuning at this rate moves the features, so the source head's
  # accuracy changes (it is recomputed, not copied).
  assert by_name['full'].source_after != by_name['probe'].source_after or (
      by_name['full'].target_accuracy != by_name['probe'].target_accuracy)
  assert rows_as_dicts(rows)[0]['forgetting'] == 0
