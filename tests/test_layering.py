"""The package's layering, read from its source: no import cycle, `parallel` below `models`, and
every PartitionSpec derived from the one rules table."""

import ast
import pathlib

import moetrain

PACKAGE = pathlib.Path(moetrain.__file__).parent
ROOT = PACKAGE.parent


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """moetrain module → the moetrain modules it imports anywhere (function bodies included)."""
  modules = {module_name(path): path for path in PACKAGE.rglob('*.py')}
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
      else:
        continue
      # A package's __init__ is not an edge: importing moetrain.models.x runs it, but it
      # imports nothing of the package (checked below for moetrain itself).
      graph[name] |= {t for t in targets
                      if t in modules and t != name and modules[t].name != '__init__.py'}
  return graph


def cycles(graph) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_module_imports_itself_back():
  graph = import_graph()
  assert 'moetrain.models.moe' in graph and graph['moetrain.models.moe']  # the scan sees edges
  assert cycles(graph) == []
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_parallel_imports_nothing_from_models():
  graph = import_graph()
  assert [(a, b) for a in graph if a.startswith('moetrain.parallel.')
          for b in graph[a] if b.startswith('moetrain.models')] == []
  assert any(b.startswith('moetrain.parallel') for b in graph['moetrain.models.moe'])


def test_every_partition_spec_comes_from_the_rules_table():
  """PartitionSpecs are built in parallel/sharding.py alone; everything else asks it."""
  hand_written = []
  for path in [*PACKAGE.rglob('*.py'), *(ROOT / 'tools').glob('*.py')]:
    if path == PACKAGE / 'parallel' / 'sharding.py':
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.ImportFrom)
               else [node.attr] if isinstance(node, ast.Attribute) else [])
      if 'PartitionSpec' in names:
        hand_written.append(f'{path.relative_to(ROOT)}:{node.lineno}')
  assert hand_written == []
  assert 'PartitionSpec' in (PACKAGE / 'parallel' / 'sharding.py').read_text()
