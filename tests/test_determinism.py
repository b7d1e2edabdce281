"""Two runs of the same config are bit for bit the same: losses and parameters, on an
expert-parallel mesh, whose collectives a single device lacks (docs/train.md names the switches
accelerators need for it)."""

import jax
import numpy as np

from moetrain import config as config_lib
from tests.steps import train
from tests.test_golden import golden_losses


def test_two_runs_are_bitwise_equal():
  config = config_lib.load('configs/tiny.py', golden_losses.CONFIGS['capacity'] + [
      '--config.mesh.data=2', '--config.mesh.expert=4'])
  devices = jax.devices()[:config.mesh.data * config.mesh.expert]
  runs = [train(config, devices, lambda i: golden_losses.batch_at(config, i), 10)
          for _ in range(2)]
  (losses, _, state), (again, _, state_again) = runs
  np.testing.assert_array_equal(losses, again)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']),
               jax.device_get(state_again['params']))
