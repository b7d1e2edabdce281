"""A run's inputs from its config: the data position a checkpoint holds."""

import pytest

from moetrain import config as config_lib
from moetrain.data import inputs
from moetrain.errors import ConfigError


def test_a_data_position_of_an_older_format_is_named():
  config = config_lib.load('configs/tiny.py', ['--config.train.eval_every=0'])
  with pytest.raises(ConfigError, match=r'data position \(data_rows, step\) is from an older '):
    inputs.load_data(config, range(config.train.batch_size), {'step': 4, 'data_rows': 64})
