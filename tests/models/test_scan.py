"""Scanned layers and remat: the same loss, gradients and routing statistics as the plain loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain.models.transformer import Transformer, layer_plan
from moetrain.state import decay_mask
from moetrain.steps import loss_and_metrics
from tests.models.test_transformer import tiny_model_config


def per_layer(params, config):
  """Scanned params/grads → the unscanned model's `blocks/{i}` layout."""
  dense, units, length, tail = layer_plan(config)
  blocks = {}
  for i in range(dense):
    blocks[i] = jax.tree.map(lambda x, i=i: x[i], params['dense_stack']['blocks'][0])
  for u in range(units):
    for j in range(length):
      blocks[dense + u * length + j] = jax.tree.map(lambda x, u=u: x[u],
                                                    params['moe_stack']['blocks'][j])
  for t in range(tail):
    blocks[dense + units * length + t] = params['tail'][t]
  rest = {k: v for k, v in params.items() if k not in ('dense_stack', 'moe_stack', 'tail')}
  return {**rest, 'blocks': blocks}


def loss_grads(config, remat='none'):
  model = Transformer(config, rngs=nnx.Rngs(0), remat=remat)
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  tokens = jax.random.randint(jax.random.key(3), (4, 17), 1, config.vocab_size)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:].at[-1, -3:].set(0)}

  @jax.jit
  def run(params, buffers):
    def objective(params):
      model = nnx.merge(graphdef, params, buffers)
      loss, metrics = loss_and_metrics(model, batch, config, 1.0, train=True,
                                       rng=jax.random.key(0))
      return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
    return jax.grad(objective, has_aux=True)(params)
  grads, (metrics, new_buffers) = run(params, buffers)
  return params, grads, metrics, new_buffers


LAYOUTS = {
    'moe': dict(),
    'dense_then_moe': dict(first_dense_layers=2),
    'alternating_with_tail': dict(first_dense_layers=1, layer_interval=2),
    'dense_model': dict(num_experts=0),
    'bias_and_jitter': dict(bias_update_rate=0.1, jitter=0.1),
}


@pytest.mark.parametrize('layout', LAYOUTS)
def test_scanned_layers_equal_unscanned(layout):
  config = tiny_model_config(**LAYOUTS[layout])
  config.num_layers = 6
  params, grads, metrics, buffers = loss_grads(config)
  config.scan_layers = True
  s_params, s_grads, s_metrics, s_buffers = loss_grads(config)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  jax.tree.map(close, per_layer(s_params, config), params)  # same initial parameters
  jax.tree.map(close, s_metrics, metrics)  # includes the per-layer stats [num_moe_layers, ...]
  jax.tree.map(close, per_layer(s_grads, config), grads)
  if LAYOUTS[layout].get('bias_update_rate'):
    jax.tree.map(close, per_layer(s_buffers, config), buffers)
  if LAYOUTS[layout].get('num_experts', 4):
    assert metrics['dropped_fraction'].max() > 0
  # Weight decay by name still spares the stacked norm scales.
  mask = decay_mask(s_params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert all(m == (str(path[-1].key) != 'scale') for path, m in flat)


@pytest.mark.parametrize('remat', ['full', 'save_dots'])
@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_keep_loss_and_gradients(remat, scan):
  config = tiny_model_config(bias_update_rate=0.1, first_dense_layers=1)
  config.num_layers, config.scan_layers = 3, scan
  _, grads, metrics, buffers = loss_grads(config)
  _, r_grads, r_metrics, r_buffers = loss_grads(config, remat)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, (r_grads, r_metrics, r_buffers), (grads, metrics, buffers))


def test_remat_is_in_the_jaxpr():
  config = tiny_model_config()
  model = Transformer(config, rngs=nnx.Rngs(0), remat='full')
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).forward(
      jnp.zeros((1, 8), jnp.int32))[0].sum())(state)
  assert 'checkpoint' in str(jaxpr) or 'remat' in str(jaxpr)
