"""The layers hold: lower modules never import the upper ones, even indirectly.

Parses every module of `fewshot/` (imports inside functions included),
follows the import graph, and fails naming the chain that breaks a rule.
"""

import ast
import pathlib

import pytest

from helpers import REPO

PACKAGE = REPO / 'fewshot'

# Everything a lower module may not reach: the builder and the harness (the
# only readers of a ConfigDict), the evaluators, reports and workdir/
# checkpoint modules above them, and the libraries only they use.
UPPER = ('fewshot.builder', 'fewshot.harness', 'fewshot.experiment',
         'fewshot.evaluators', 'fewshot.reports', 'fewshot.workdir',
         'fewshot.checkpoint', 'fewshot.config_args', 'fewshot.signals',
         'fewshot.config_drift',
         'ml_collections', 'orbax')
LOWER = ('fewshot.algorithms', 'fewshot.transfer', 'fewshot.backbones',
         'fewshot.data', 'fewshot.ops', 'fewshot.episodes', 'fewshot.heads',
         'fewshot.stats', 'fewshot.optimizers', 'fewshot.losses',
         'fewshot.features', 'fewshot.objectives', 'fewshot.metric',
         'fewshot.multitask', 'fewshot.adaptation', 'fewshot.distillation',
         'fewshot.peft', 'fewshot.progress', 'fewshot.records', 'fewshot.mesh')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Modules `path` imports anywhere, as absolute dotted names."""
  name = _module_name(path)
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      found.add(base)
      found.update(f'{base}.{alias.name}' for alias in node.names)
  return found


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for target in _imports(path):
      # `from fewshot.data import sampling` names a module or an attribute;
      # either way the package's __init__ runs, and so do its parents'.
      parts = target.split('.')
      for i in range(1, len(parts) + 1):
        prefix = '.'.join(parts[:i])
        if prefix in modules or not prefix.startswith('fewshot'):
          edges.add(prefix)
    graph[name] = edges - {name}
  return graph


def _chain_to_upper(graph, start):
  """A shortest import chain from `start` to an UPPER module, or None.

  The root package `fewshot` is the public facade above every layer (its
  `train_and_evaluate` is a lazy attribute): importing any submodule runs
  it, but what it re-exports is not an import of that submodule's.
  """
  frontier, seen = [[start]], {start}
  while frontier:
    chain = frontier.pop(0)
    for target in sorted(graph.get(chain[-1], ())):
      if target.startswith(UPPER) and target != 'fewshot':
        return chain + [target]
      if (target not in seen and target.startswith('fewshot.')):
        seen.add(target)
        frontier.append(chain + [target])
  return None


GRAPH = _graph()


@pytest.mark.parametrize('module', sorted(m for m in GRAPH
                                          if m.startswith(LOWER)))
def test_lower_layers_never_reach_the_upper_ones(module):
  chain = _chain_to_upper(GRAPH, module)
  assert chain is None, ' -> '.join(chain)


def test_nothing_in_the_package_imports_experiments_or_configs():
  for module, targets in GRAPH.items():
    bad = sorted(t for t in targets
                 if t.split('.')[0] in ('experiments', 'configs'))
    assert not bad, f'{module} imports {bad}'


def test_the_graph_sees_real_edges():
  # The checker itself can fail: known edges are in the graph, and a
  # chain through a package __init__ is found.
  assert 'fewshot.builder' in GRAPH['fewshot.harness']
  assert 'orbax' in GRAPH['fewshot.checkpoint']
  assert 'fewshot.heads' in GRAPH['fewshot.algorithms.maml']
  chain = _chain_to_upper({'fewshot.a': {'fewshot.b'},
                           'fewshot.b': {'fewshot.harness'}}, 'fewshot.a')
  assert chain == ['fewshot.a', 'fewshot.b', 'fewshot.harness']
