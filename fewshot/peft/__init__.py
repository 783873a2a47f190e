"""Parameter-efficient fine-tuning: LoRA, BitFit and adapters on a Backbone.

A transform of `fewshot.backbones.Backbone`; the flax modules are unchanged.
Only LoRA factors, chosen leaves and adapters are params; the frozen base
weights ride in the model state under 'frozen':

    rules = peft.lora_rules(['conv[1-3]'], rank=4, train=['norm.*'])
    backbone = peft.peft_backbone(backbones.create('conv4'), rules)
    params, model_state = backbone.init(key, images)  # train `params` only

`count_parameters(params, model_state)` reports the trainable share;
`merge_params(params, model_state, rules)` folds LoRA back into plain base
params for export.
"""

from __future__ import annotations

from fewshot.peft.adapters import (ACTIVATIONS, apply_adapter, init_adapter,
                                   intercepting, output_features)
from fewshot.peft.backbone import (FROZEN, ParameterCount, count_parameters,
                                   merge_params, peft_backbone,
                                   with_fixed_init)
from fewshot.peft.lora import delta, init_factors, merge
from fewshot.peft.rules import (LeafRule, Rules, bitfit_rules, check_rules,
                                kernels_under, lora_rules, parse_action,
                                resolve_rules)

__all__ = ['ACTIVATIONS', 'FROZEN', 'LeafRule', 'ParameterCount', 'Rules',
           'apply_adapter', 'bitfit_rules', 'check_rules', 'count_parameters',
           'delta', 'init_adapter', 'init_factors', 'intercepting',
           'kernels_under', 'lora_rules', 'merge', 'merge_params',
           'output_features', 'parse_action', 'peft_backbone',
           'resolve_rules', 'with_fixed_init']
