"""Gradient accumulation: k microbatches give the loss and gradients of one batch k times larger."""


import jax
import numpy as np
import pytest
from flax import nnx

from moetrain.errors import ConfigError
from moetrain.parallel.mesh import make_mesh
from moetrain.state import make_setup
from moetrain.steps import loss_and_metrics, split_microbatches
from tests.steps import first_gradients
from tests.test_trainer import batch_for, small_config


def step_gradients(config, devices):
  return first_gradients(config, devices, batch_for(config))


@pytest.mark.parametrize('group_size', [1, 2])
def test_microbatches_equal_one_large_batch(group_size):
  common = ['--config.model.moe.group_size=%d' % group_size]
  one = small_config(*common)
  four = small_config(*common, '--config.train.microbatches=4')
  devices = jax.devices()[:2]
  (grads1, metrics1, _), state = step_gradients(one, devices)
  (grads4, metrics4, _), _ = step_gradients(four, devices)
  # Dropping happens per dispatch group, and microbatches hold whole groups: same drops.
  assert metrics1['dropped_fraction'].max() > 0
  for key in ('loss', 'z_loss', 'z_loss_per_layer', 'tokens'):
    np.testing.assert_allclose(metrics4[key], metrics1[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # Routing statistics are summed over microbatches before any ratio is taken: the step's
  # per-layer figures do not depend on how it was split.
  for key in ('max_load', 'expert_fraction', 'dropped_fraction', 'experts_per_token',
              'router_entropy'):
    np.testing.assert_allclose(metrics4[key], metrics1[key], rtol=1e-4, atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads4, grads1)

  # The aux loss is the mean of the per-microbatch values, each computed on its own.
  setup = make_setup(one, make_mesh(one, jax.devices()[:1]))
  micro = split_microbatches(batch_for(one), 4, group_size)

  @jax.jit
  def microbatch_aux(params, buffers, microbatch):
    model = nnx.merge(setup.graphdef, params, buffers)
    _, metrics = loss_and_metrics(model, microbatch, one.model, one.model.moe.capacity_factor,
                                  train=True)
    return metrics['aux_loss_per_layer']
  aux = [microbatch_aux(state['params'], state['buffers'], {k: v[i] for k, v in micro.items()})
         for i in range(4)]
  np.testing.assert_allclose(metrics4['aux_loss_per_layer'], np.mean(aux, axis=0), rtol=1e-5)
  np.testing.assert_allclose(metrics4['aux_loss'], np.mean(aux, axis=0).sum(), rtol=1e-5)


def test_balancing_bias_moves_once_per_step_by_the_step_load():
  rate = ['--config.model.moe.bias_update_rate=0.1']
  (_, metrics1, buffers1), _ = step_gradients(small_config(*rate), jax.devices()[:2])
  (_, metrics4, buffers4), _ = step_gradients(
      small_config('--config.train.microbatches=4', *rate), jax.devices()[:2])
  # Every bias moved by ±rate toward balance, by the load of all four microbatches together
  # (MOE_SPEC.md), so the split does not change it.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), buffers4, buffers1)
  biases = np.stack([leaf for leaf in jax.tree.leaves(buffers4)])
  load = np.asarray(metrics4['expert_fraction'])
  np.testing.assert_allclose(biases.reshape(load.shape),
                             0.1 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)
  assert np.abs(biases).max() > 0


def test_microbatches_must_divide_the_batch_and_the_mesh():
  with pytest.raises(ConfigError, match='train.microbatches'):
    small_config('--config.train.microbatches=3')
  config = small_config('--config.train.microbatches=4')
  with pytest.raises(ConfigError, match='microbatches'):
    make_mesh(config, jax.devices()[:8])
