"""Draws a run's training batches as `moetrain.train` does, on one or more processes.

  python -m tests.data.elastic_batches OUT STEPS SAVE_AFTER [POSITION] -- TRAIN_ARGS

TRAIN_ARGS are `moetrain.train`'s (a config, overrides, the multi-process flags). Each process
writes OUT/batches-P.npz (its lanes and the inputs of every batch it drew); process 0 writes
OUT/position.json, the data position a checkpoint after SAVE_AFTER steps holds. POSITION
resumes from such a file.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from moetrain import config as config_lib, train
from moetrain.data.inputs import data_position, load_data
from moetrain.parallel import sharding
from moetrain.parallel.mesh import make_mesh


def main(argv):
  split = argv.index('--')
  out, steps, save_after, *position = argv[:split]
  config_path, _, overrides, distributed = train.parse_command_line(argv[split + 1:])
  config = config_lib.load(config_path, overrides)
  train.initialize_distributed(distributed, config.train.heartbeat_timeout_s)
  lanes = sharding.process_rows(sharding.batch_sharding(make_mesh(config)),
                                config.train.batch_size)
  resume = json.loads(pathlib.Path(position[0]).read_text()) if position else None
  _, batches, _, _ = load_data(config, lanes, resume)
  drawn = []
  for step in range(1, int(steps) + 1):
    drawn.append(next(batches)['inputs'])
    if step == int(save_after):
      saved = data_position(batches)
      if jax.process_index() == 0:
        (pathlib.Path(out) / 'position.json').write_text(json.dumps(saved))
  np.savez(pathlib.Path(out) / f'batches-{jax.process_index()}.npz', lanes=lanes,
           inputs=np.stack(drawn))


if __name__ == '__main__':
  main(sys.argv[1:])
