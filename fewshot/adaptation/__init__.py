"""Unsupervised domain adaptation: the losses and tools of each method.

* `adversarial`: gradient reversal, the DANN coefficient schedule, the
  domain discriminator, DANN's and CDAN's (+E) domain losses;
* `alignment`: statistic alignment losses, multi-kernel MMD (DAN) and CORAL;
* `confusion`: minimum class confusion (MCC);
* `self_training`: confidence-thresholded pseudo-labels (FixMatch-style);
* `batch_norm`: AdaBN, BatchNorm statistics re-estimated on the target.

The objective that trains with them is `fewshot.objectives.adaptation`.
"""

from fewshot.adaptation.adversarial import (cdan_entropy_weights,
                                            dann_coefficient,
                                            discriminator_logits,
                                            domain_adversarial_loss,
                                            gradient_reversal,
                                            init_discriminator,
                                            multilinear_map)
from fewshot.adaptation.alignment import coral, mmd_loss
from fewshot.adaptation.batch_norm import adapt_batch_norm, batch_statistics
from fewshot.adaptation.confusion import entropy, minimum_class_confusion
from fewshot.adaptation.self_training import pseudo_label_loss

__all__ = ['adapt_batch_norm', 'batch_statistics', 'cdan_entropy_weights',
           'coral', 'dann_coefficient', 'discriminator_logits',
           'domain_adversarial_loss', 'entropy', 'gradient_reversal',
           'init_discriminator', 'minimum_class_confusion', 'mmd_loss',
           'multilinear_map', 'pseudo_label_loss']
