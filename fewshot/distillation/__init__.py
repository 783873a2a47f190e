"""Knowledge distillation: soft-target losses and intermediate features.

* `losses`: Hinton et al.'s KD loss (temperature, alpha, the tau^2 scale);
* `features`: a module's intermediate output by path (flax
  `capture_intermediates`) and FitNets' hint loss through a learned
  projection.

The objective that trains a student with them is
`fewshot.objectives.distillation`.
"""

from fewshot.distillation.features import (apply_capturing, hint_loss,
                                           init_projection, match_spatial)
from fewshot.distillation.losses import kd_loss, soft_cross_entropy

__all__ = ['apply_capturing', 'hint_loss', 'init_projection', 'kd_loss',
           'match_spatial', 'soft_cross_entropy']
