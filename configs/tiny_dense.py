"""configs/tiny.py without experts: the dense model that the tiny MoE is upcycled from.

  python -m moetrain.train --config configs/tiny_dense.py --workdir runs/dense
  python -m moetrain.train --config configs/tiny.py --workdir runs/moe \
      --config.init.upcycle_from=runs/dense
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('tiny.py')))
  config.model.moe.num_experts = 0
  return config
