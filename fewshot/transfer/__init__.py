"""Transfer-learning toolkit: optax/pytree utilities for fine-tuning.

Freezing by parameter path, per-layer learning rates, gradual unfreezing,
L2-SP, early stopping, colour jitter, and negative-transfer diagnostics (MMD,
transfer tables). The algorithms built on them (`linear_probe`, `simpleshot`,
`baseline_pp`, `fine_tune`) live in `fewshot.algorithms.baselines`; the
reports that evaluate models with them in `fewshot.reports`.
"""

from fewshot.optimizers import inner_optimizer
from fewshot.transfer.augment import color_jitter
from fewshot.transfer.diagnostics import TransferReport, mmd, transfer_report
from fewshot.transfer.early_stopping import EarlyStopping
from fewshot.transfer.finetune import fit
from fewshot.transfer.masks import freeze, param_paths, path_mask
from fewshot.transfer.regularizers import l2sp, l2sp_penalty
from fewshot.transfer.schedules import (gradual_unfreezing,
                                        layerwise_lr_scales, scale_by_tree)

__all__ = [
    'EarlyStopping', 'TransferReport', 'color_jitter', 'fit', 'freeze',
    'gradual_unfreezing', 'inner_optimizer', 'l2sp', 'l2sp_penalty',
    'layerwise_lr_scales', 'mmd', 'param_paths', 'path_mask',
    'scale_by_tree', 'transfer_report',
]
