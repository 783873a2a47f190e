"""Few-shot algorithms: each a factory returning an `Algorithm` of pure functions."""

from fewshot.algorithms.base import Algorithm
from fewshot.algorithms.protonet import protonet

# name -> factory(backbone, **config.algorithm); grep-able, no import magic.
ALGORITHMS = {
    'protonet': protonet,
}

__all__ = ['ALGORITHMS', 'Algorithm', 'protonet']
