"""configs/tiny.py without experts: the dense model that the tiny MoE is upcycled from.

  python -m moetrain.train --config configs/tiny_dense.py --workdir runs/dense
  python -m moetrain.train --config configs/tiny.py --workdir runs/moe \
      --config.init.upcycle_from=runs/dense
"""

import importlib.util
import pathlib


def get_config():
  spec = importlib.util.spec_from_file_location(
      'tiny', pathlib.Path(__file__).with_name('tiny.py'))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config()
  config.model.moe.num_experts = 0
  return config
