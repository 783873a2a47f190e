"""Few-shot algorithms: each a factory returning an `Algorithm` of pure functions."""

from fewshot.algorithms.base import Algorithm
from fewshot.algorithms.baselines import (baseline_pp, fine_tune, linear_probe,
                                          simpleshot)
from fewshot.algorithms.maml import anil, fomaml, maml, metasgd, proto_maml
from fewshot.algorithms.matching import matching_net
from fewshot.algorithms.protonet import protonet
from fewshot.algorithms.relation import relation_net
from fewshot.algorithms.setfit import setfit

# name -> factory(backbone, **config.algorithm); grep-able, no import magic.
ALGORITHMS = {
    'protonet': protonet,
    'matching_net': matching_net,
    'relation_net': relation_net,
    'maml': maml,
    'fomaml': fomaml,
    'anil': anil,
    'metasgd': metasgd,
    'proto_maml': proto_maml,
    'linear_probe': linear_probe,
    'simpleshot': simpleshot,
    'baseline_pp': baseline_pp,
    'fine_tune': fine_tune,
    'setfit': setfit,
}

__all__ = ['ALGORITHMS', 'Algorithm', 'anil', 'baseline_pp', 'fine_tune',
           'fomaml', 'linear_probe', 'maml', 'matching_net', 'metasgd',
           'proto_maml', 'protonet', 'relation_net', 'setfit', 'simpleshot']
