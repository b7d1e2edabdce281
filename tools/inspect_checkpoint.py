"""What a moetrain checkpoint holds, read from its metadata (no arrays are loaded).

  python tools/inspect_checkpoint.py DIR [--step N]

DIR is a run's workdir, its `checkpoints` directory or one step directory inside it. Prints the
step, the data position, a config summary and every array of the train state with its shape,
dtype and size.
"""

import argparse
import json
import math
import pathlib
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SUMMARY_FIELDS = (
    'model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
    'model.num_kv_heads', 'model.d_ff', 'model.moe.num_experts', 'model.moe.top_k',
    'model.moe.router', 'model.moe.num_shared_experts', 'train.batch_size', 'train.seq_len',
    'train.steps', 'mesh.data', 'mesh.fsdp', 'mesh.expert', 'mesh.tensor')


def _position(progress: dict) -> str:
  if 'data' not in progress:
    return 'in an older format (' + ', '.join(sorted(set(progress) - {'step'})) + ')'
  lanes = progress['data']['documents']
  return f'{sum(lanes):,} documents begun by {len(lanes)} lanes (the global batch\'s rows)'


class InspectError(Exception):
  pass


def locate(path: pathlib.Path, step: int | None) -> tuple[pathlib.Path, int | None]:
  """(checkpoints directory, step or None for the latest) for a DIR given on the command line."""
  if not path.is_dir():
    raise InspectError(f'{path}: no such directory')
  if path.name.isdigit() and (path / 'state').is_dir():
    return path.parent, int(path.name) if step is None else step
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  return path, step


def field(config: dict, dotted: str):
  node = config
  for key in dotted.split('.'):
    node = node.get(key, {}) if isinstance(node, dict) else {}
  return node if node != {} else None


def inspect(path: pathlib.Path, step: int | None) -> str:
  import numpy as np
  import orbax.checkpoint as ocp
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # Orbax's notes on read-only managers

  from moetrain import checkpoint
  directory, step = locate(path, step)
  manager = checkpoint.manager(directory, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise InspectError(f'{directory}: no finished checkpoints')
  step = max(steps) if step is None else step
  if step not in steps:
    raise InspectError(f'{directory}: no checkpoint of step {step} (there are {sorted(steps)})')
  saved = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore(),
                                                        config=ocp.args.JsonRestore()))
  lines = [f'checkpoint {directory / str(step)}: step {step} (all steps: {sorted(steps)})',
           f'data position: {_position(saved["progress"])}',
           'config: ' + ', '.join(f'{name}={json.dumps(field(saved["config"], name))}'
                                  for name in SUMMARY_FIELDS)]
  totals = {}
  table = []
  for name, leaf in checkpoint.arrays(manager.item_metadata(step)['state']).items():
    shape, dtype = tuple(leaf.shape), str(np.dtype(leaf.dtype))
    count = math.prod(shape)
    size = count * np.dtype(dtype).itemsize
    part = name.split('/')[0]
    totals[part] = (totals.get(part, (0, 0))[0] + count, totals.get(part, (0, 0))[1] + size)
    table.append(f'  {name:<64} {str(shape):<18} {dtype:<9} {count:>12,} {size / 2**20:9.2f} MiB')
  lines.append(f'  {"array":<64} {"shape":<18} {"dtype":<9} {"elements":>12} {"size":>13}')
  lines += table
  lines += [f'total {part}: {count:,} elements, {size / 2**20:.2f} MiB'
            for part, (count, size) in totals.items()]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('dir', type=pathlib.Path, help='workdir, checkpoints dir or step dir')
  parser.add_argument('--step', type=int, help='a step other than the latest')
  args = parser.parse_args(argv)
  try:
    print(inspect(args.dir, args.step))
  except InspectError as error:
    print(f'inspect_checkpoint: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
