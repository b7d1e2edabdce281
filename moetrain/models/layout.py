"""The model's parameters as a flat, per-layer namespace, whatever the layer layout.

`nnx.to_pure_dict` of a `Transformer` nests arrays by module path; with `scan_layers` the
blocks are stacked into `dense_stack`, `moe_stack` and `tail`. Conversion and upcycling work
per layer instead, on names such as `blocks/3/attention/wq` or `blocks/3/ffn/w_gate` (the
unscanned paths; the block of multi-token-prediction module j is `blocks/{N + j}` after the N
main layers). `to_layers` and `from_layers` translate between the two, for numpy arrays on
the host and for jax arrays inside a jitted function alike. A circular pipeline stores its main
stack as [repeats, units / repeats]: the stack in order, row by row.
"""

import jax.numpy as jnp
import numpy as np

from moetrain.models.transformer import layer_plan, main_stack


def flatten(tree: dict, prefix: str = '') -> dict:
  """Nested dict → `{'a/b/c': leaf}`."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
  return flat


def unflatten(flat: dict) -> dict:
  """`{'a/0/c': leaf}` → nested dict; all-digit parts become int keys, as in nnx.to_pure_dict."""
  tree = {}
  for name, value in flat.items():
    *parents, last = [int(part) if part.isdigit() else part for part in name.split('/')]
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


def _stacks(model_config):
  """(stack prefix, number of stacked copies, layer index of copy c at unit offset j)."""
  dense, units, length, tail = layer_plan(model_config)
  start = dense + units * length
  return (('dense_stack/blocks/', dense, lambda c, j: c),
          ('moe_stack/blocks/', units, lambda c, j: dense + c * length + j),
          ('tail/', tail, lambda c, j: start + j))


def _repeated(name: str, model_config) -> bool:
  """Whether `name` is an array of the main stack stored [repeats, units / repeats]."""
  return (model_config.get('pipeline_repeats', 1) > 1
          and name.startswith(main_stack(model_config) + '/'))


def _mtp_to_layers(flat: dict, num_layers: int) -> dict:
  """Multi-token-prediction module j's block `mtp/j/block/…` → `blocks/{N + j}/…`, numbered
  after the N main layers as DeepSeek-V3 numbers it; its other arrays keep their names."""
  out = {}
  for name, value in flat.items():
    parts = name.split('/')
    if parts[0] == 'mtp' and parts[2] == 'block':
      name = '/'.join(['blocks', str(num_layers + int(parts[1]))] + parts[3:])
    out[name] = value
  return out


def _mtp_from_layers(flat: dict, num_layers: int) -> dict:
  """The inverse of `_mtp_to_layers`."""
  out = {}
  for name, value in flat.items():
    parts = name.split('/')
    if parts[0] == 'blocks' and int(parts[1]) >= num_layers:
      name = '/'.join(['mtp', str(int(parts[1]) - num_layers), 'block'] + parts[2:])
    out[name] = value
  return out


def to_layers(tree: dict, model_config) -> dict:
  """A params (or buffers) tree in the model's layout → flat per-layer names."""
  flat = _mtp_to_layers(flatten(tree), model_config.num_layers)
  if not model_config.get('scan_layers', False):
    return flat
  out = {}
  for name, value in flat.items():
    if _repeated(name, model_config):
      value = value.reshape((-1,) + value.shape[2:])
    for prefix, copies, layer in _stacks(model_config):
      if name.startswith(prefix):
        offset, rest = name[len(prefix):].split('/', 1)
        if prefix == 'tail/':
          out[f'blocks/{layer(0, int(offset))}/{rest}'] = value
        else:
          for copy in range(copies):
            out[f'blocks/{layer(copy, int(offset))}/{rest}'] = value[copy]
        break
    else:
      out[name] = value
  return out


def from_layers(flat: dict, model_config) -> dict:
  """Flat per-layer names → the tree `nnx.to_pure_dict` gives for `model_config`'s layout."""
  flat = _mtp_from_layers(flat, model_config.num_layers)
  if not model_config.get('scan_layers', False):
    return unflatten(flat)
  dense, units, length, tail = layer_plan(model_config)
  where = {}  # layer index → (stacked name prefix, copy index or None)
  for prefix, copies, layer in _stacks(model_config):
    if prefix == 'tail/':
      for offset in range(copies):
        where[layer(0, offset)] = (f'tail/{offset}/', None)
    else:
      for copy in range(copies):
        for offset in range(1 if prefix.startswith('dense') else length):
          where[layer(copy, offset)] = (f'{prefix}{offset}/', copy)
  out, stacked = {}, {}
  for name, value in flat.items():
    if not name.startswith('blocks/'):
      out[name] = value
      continue
    index, rest = name[len('blocks/'):].split('/', 1)
    prefix, copy = where[int(index)]
    if copy is None:
      out[prefix + rest] = value
    else:
      stacked.setdefault(prefix + rest, {})[copy] = value
  for name, copies in stacked.items():
    values = [copies[c] for c in sorted(copies)]
    xp = np if isinstance(values[0], np.ndarray) else jnp
    out[name] = xp.stack(values)
    if _repeated(name, model_config):
      out[name] = out[name].reshape((model_config.pipeline_repeats, -1) + out[name].shape[1:])
  return unflatten(out)
