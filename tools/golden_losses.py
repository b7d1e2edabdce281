"""The golden loss curves: the first 30 losses of two small configs (capacity and dropless
routing) on one CPU device, from random token batches, which `tests/test_golden.py` holds every
change to (1e-5 relative).

  .venv/bin/python tools/golden_losses.py           # compares, prints the largest difference
  .venv/bin/python tools/golden_losses.py --write   # regenerates tests/golden/*.json

A change that moves them says why in its commit message.
"""

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / 'tests' / 'golden'
STEPS = 30
SMALL = ['--config.model.vocab_size=64', '--config.model.d_model=32', '--config.model.d_ff=48',
         '--config.model.num_layers=2', '--config.model.max_seq_len=16',
         '--config.train.batch_size=8', '--config.train.seq_len=16',
         f'--config.train.steps={STEPS}', '--config.train.warmup_steps=5',
         '--config.mesh.data=1']
CONFIGS = {'capacity': SMALL, 'dropless': SMALL + ['--config.model.moe.capacity_factor=0']}


def config_for(name: str):
  from moetrain import config as config_lib
  return config_lib.load(str(ROOT / 'configs' / 'tiny.py'), CONFIGS[name])


def batch_at(config, step: int) -> dict:
  """Step `step`'s batch, from a generator seeded by the step: rows that follow a fixed
  successor table nine times in ten (something to learn) and a random token otherwise."""
  import numpy as np
  vocab, rows, length = (config.model.vocab_size, config.train.batch_size,
                         config.train.seq_len + 1)
  successor = np.random.default_rng(1234).permutation(np.arange(4, vocab))
  rng = np.random.default_rng(step)
  tokens = np.empty((rows, length), np.int32)
  tokens[:, 0] = rng.integers(4, vocab, rows)
  for t in range(1, length):
    follow = successor[tokens[:, t - 1] - 4]
    tokens[:, t] = np.where(rng.random(rows) < 0.9, follow, rng.integers(4, vocab, rows))
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def losses(name: str) -> list[float]:
  """The first `STEPS` train losses of config `name` on one device."""
  import jax
  from moetrain import trainer
  from moetrain.parallel.mesh import make_mesh
  from moetrain.state import init_state, make_setup
  from moetrain.steps import make_train_step
  config = config_for(name)
  setup = make_setup(config, make_mesh(config, jax.devices()[:1]))
  with jax.set_mesh(setup.mesh):
    state, step, out = init_state(setup), make_train_step(setup), []
    for i in range(STEPS):
      state, metrics = step(state, trainer.global_batch(setup, batch_at(config, i)))
      out.append(metrics['loss'])
    return [float(loss) for loss in jax.device_get(out)]


def golden(name: str) -> list[float]:
  return json.loads((GOLDEN_DIR / f'{name}.json').read_text())['losses']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--write', action='store_true', help='regenerate tests/golden/*.json')
  args = parser.parse_args(argv)
  for name in CONFIGS:
    now = losses(name)
    if args.write:
      (GOLDEN_DIR / f'{name}.json').write_text(json.dumps(
          {'config': ['configs/tiny.py', *CONFIGS[name]], 'losses': now}, indent=1) + '\n')
      print(f'{name}: wrote {STEPS} losses, {now[0]:.5f} → {now[-1]:.5f}')
    else:
      worst = max(abs(a - b) / abs(b) for a, b in zip(now, golden(name)))
      print(f'{name}: largest relative difference {worst:.2e}')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, str(ROOT))
  sys.exit(main())
