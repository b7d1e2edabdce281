"""Every routing scheme trains the tiny model, and its losses do not depend on the mesh."""

import functools

import jax
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import trainer
from moetrain.parallel.mesh import make_mesh
from moetrain.state import init_state, make_setup
from moetrain.steps import gradients
from tests.steps import train

SMALL = ['--config.model.vocab_size=64', '--config.model.d_model=32', '--config.model.d_ff=64',
         '--config.model.num_layers=2', '--config.model.max_seq_len=32',
         '--config.train.batch_size=8', '--config.train.seq_len=32',
         '--config.train.warmup_steps=5', '--config.train.learning_rate=1e-2',
         '--config.train.steps=30', '--config.train.sample_tokens=0']

ROUTERS = {
    'switch_top1': ['--config.model.moe.top_k=1'],
    'gshard_top2_priority': ['--config.model.moe.drop_policy=priority',
                             '--config.model.moe.jitter=0.01'],
    'deepseek_sigmoid_bias_groups': [
        '--config.model.moe.router=sigmoid', '--config.model.moe.bias_update_rate=0.001',
        '--config.model.moe.num_groups=4', '--config.model.moe.topk_groups=2',
        '--config.model.moe.routed_scaling_factor=2.5', '--config.model.moe.aux_loss=sequence',
        '--config.model.moe.aux_loss_weight=0.0001', '--config.model.moe.num_shared_experts=1',
        '--config.model.moe.d_expert=32'],
    'expert_choice': ['--config.model.moe.router=expert_choice'],
    'null_experts': ['--config.model.moe.num_null_experts=4', '--config.model.moe.top_k=3'],
    'qwen_shared_gated_dropless': ['--config.model.moe.num_shared_experts=1',
                                   '--config.model.moe.shared_expert_gate=true',
                                   '--config.model.moe.norm_topk_prob=false',
                                   '--config.model.moe.capacity_factor=0',
                                   '--config.model.moe.aux_loss=global'],
    'top_p_dynamic': ['--config.model.moe.router=top_p', '--config.model.moe.top_k=4',
                      '--config.model.moe.top_p_threshold=0.4',
                      '--config.model.moe.dynamic_loss_weight=1e-4'],
}


def patterned_batch(config, step):
  """Sequences of an affine recurrence mod V: learnable, different every step."""
  rng = np.random.default_rng(step)
  b, l, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
  starts = rng.integers(1, v, (b, 1))
  tokens = (starts * 7 + np.arange(l + 1)[None, :] * 5) % (v - 1) + 1
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32)}


@pytest.mark.parametrize('router', ROUTERS)
def test_each_router_trains(router):
  config = config_lib.load('configs/tiny.py', SMALL + ROUTERS[router])
  losses, metrics, state = train(config, jax.devices()[:1],
                                 functools.partial(patterned_batch, config), 30)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  if '--config.model.moe.bias_update_rate=0.001' in ROUTERS[router]:
    biases = np.asarray(metrics['router_bias'])
    assert np.abs(biases).max() > 0  # the bias moved, outside the gradient
    assert 'router_bias' not in str(jax.tree_util.tree_structure(state['params']))
  if router == 'null_experts':
    assert 0 < float(np.mean(metrics['experts_per_token'])) <= 3
  if router == 'top_p_dynamic':  # a token takes 1 to 4 experts; the mean lies between
    assert 1 < float(np.mean(metrics['experts_per_token'])) < 4, metrics['experts_per_token']


def test_multi_token_prediction_trains_the_tiny_deepseek_v3_on_an_expert_mesh():
  config = config_lib.load('configs/tiny_deepseek_v3.py', SMALL + [
      '--config.model.mtp_layers=1', '--config.mesh.expert=2', '--config.mesh.data=2'])
  mtp_losses, metrics, _ = train(config, jax.devices()[:4],
                                 functools.partial(patterned_batch, config), 30, 'mtp_loss')
  losses = np.asarray(metrics['loss'])
  assert np.all(np.isfinite(mtp_losses)) and np.isfinite(losses)
  # Both fall: the main loss of the last step, and the depth-1 loss from its first steps.
  assert mtp_losses[-3:].mean() < 0.8 * mtp_losses[:3].mean(), mtp_losses
  assert losses < 0.8 * np.log(config.model.vocab_size), losses
  np.testing.assert_allclose(metrics['mtp_loss_per_depth'], [mtp_losses[-1]], rtol=1e-6)
  # Layer 0 is dense, layer 1 MoE: the module's MoE block reports after it.
  assert np.asarray(metrics['expert_fraction']).shape == (1 + 1, 8)
  np.testing.assert_allclose(
      metrics['total_loss'], metrics['loss'] + 0.3 * metrics['mtp_loss']
      + 1e-4 * metrics['aux_loss'], rtol=1e-5)


def one_step(config, devices):
  mesh = make_mesh(config, devices)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    state = init_state(setup)
    batch = trainer.global_batch(setup, patterned_batch(config, 0))
    grads, metrics, _ = jax.jit(functools.partial(gradients, setup))(
        state['params'], state['buffers'], batch, jax.random.key(0))
    return jax.device_get((grads, metrics))


@pytest.mark.parametrize('aux_loss', ['local', 'global', 'sequence'])
def test_aux_loss_and_its_gradient_do_not_depend_on_the_mesh(aux_loss):
  config = config_lib.load('configs/tiny.py', SMALL + [
      f'--config.model.moe.aux_loss={aux_loss}', '--config.model.moe.group_size=2',
      '--config.model.moe.aux_loss_weight=1.0', '--config.train.batch_size=16'])
  single_grads, single = one_step(config, jax.devices()[:1])
  sharded_grads, sharded = one_step(config, jax.devices()[:8])
  np.testing.assert_allclose(sharded['aux_loss'], single['aux_loss'], rtol=1e-5)
  assert float(single['aux_loss']) > 2.0  # two layers, each at least 1.0
  for layer in single_grads['blocks']:
    np.testing.assert_allclose(sharded_grads['blocks'][layer]['ffn']['router'],
                               single_grads['blocks'][layer]['ffn']['router'],
                               rtol=1e-4, atol=1e-7)
