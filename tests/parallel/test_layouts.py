"""Every mesh layout gives the single-device results: one step exactly; 20 steps closely on
the layouts that combine three kinds of parallelism."""

import functools

import jax
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain.steps import make_train_step
from tests.steps import first_gradients, random_batch

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 8, 1), (2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 2, 2)]
TRAINED = [(2, 2, 2, 1), (1, 2, 2, 2)]  # each compiles a train step more


def layout_config(data, fsdp, expert, tensor):
  return config_lib.load('configs/tiny.py', [
      '--config.model.vocab_size=128', '--config.model.d_model=32', '--config.model.d_ff=64',
      '--config.model.num_layers=2', '--config.model.max_seq_len=16',
      '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
      '--config.model.moe.num_experts=8', '--config.model.moe.capacity_factor=1.0',
      '--config.train.batch_size=16', '--config.train.seq_len=16',
      '--config.train.warmup_steps=0', '--config.train.learning_rate=1e-2',
      f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
      f'--config.mesh.expert={expert}', f'--config.mesh.tensor={tensor}'])


def run_on(config, devices, steps):
  """First-step gradients and metrics, and the losses of `steps` training steps."""
  def train(setup, state, batch):
    if not steps:
      return None
    train_step, losses = make_train_step(setup), []
    for _ in range(steps):
      state, step_metrics = train_step(state, batch)
      losses.append(float(step_metrics['total_loss']))
    return np.asarray(losses)
  (grads, metrics, _), _, losses = first_gradients(config, devices, random_batch(config),
                                                   then=train)
  return grads, metrics, losses


@functools.cache
def single_device():
  return run_on(layout_config(1, 1, 1, 1), jax.devices()[:1], 20)


@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_layout_equals_single_device(mesh):
  single_grads, single, single_losses = single_device()
  grads, metrics, losses = run_on(layout_config(*mesh), jax.devices()[:8],
                                  20 if mesh in TRAINED else 0)
  assert single['dropped_fraction'].max() > 0  # capacity dropping is on
  for key in ('loss', 'aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
    np.testing.assert_allclose(metrics[key], single[key], rtol=2e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, single_grads)
  assert single_losses[-1] < 0.8 * single_losses[0]  # the 20 steps really train
  if mesh in TRAINED:
    np.testing.assert_allclose(losses, single_losses, rtol=1e-3)
