"""The language model: layer placement, causality, dense mode, and that it can learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain.models.moe import MoE
from moetrain.models.plan import is_moe_layer
from moetrain.models.transformer import Transformer


def tiny_model_config(**moe):
  config = config_lib.default_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 64, 32, 2, 4, 2
  m.d_ff, m.max_seq_len = 64, 32
  m.moe.num_experts, m.moe.top_k = 4, 2
  for key, value in moe.items():
    m.moe[key] = value
  return m


@pytest.mark.parametrize('first_dense, interval, expected', [
    (0, 1, [1, 1, 1, 1, 1, 1]),
    (0, 2, [0, 1, 0, 1, 0, 1]),
    (2, 1, [0, 0, 1, 1, 1, 1]),
    (1, 2, [0, 0, 1, 0, 1, 0]),
])
def test_moe_layer_placement(first_dense, interval, expected):
  m = tiny_model_config(first_dense_layers=first_dense, layer_interval=interval)
  m.num_layers = 6
  assert [int(is_moe_layer(m, i)) for i in range(6)] == expected
  model = Transformer(m, rngs=nnx.Rngs(0))
  assert [int(isinstance(b.ffn, MoE)) for b in model.blocks] == expected


def test_dense_model_has_no_routing_statistics():
  model = Transformer(tiny_model_config(num_experts=0), rngs=nnx.Rngs(0))
  logits, stats = model.forward(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 64) and logits.dtype == jnp.float32
  assert stats.aux_loss.shape == (0,) and stats.assignments_E.shape == (0, 0)


def test_logits_are_causal():
  graphdef, state = nnx.split(Transformer(tiny_model_config(), rngs=nnx.Rngs(0)))
  model = jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 64)
  changed = tokens.at[0, 10:].set((tokens[0, 10:] + 1) % 64)
  np.testing.assert_allclose(model(tokens)[0, :10], model(changed)[0, :10], atol=1e-6)
  assert not np.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])


def test_model_overfits_one_batch():
  model = Transformer(tiny_model_config(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  tokens = jax.random.randint(jax.random.key(2), (4, 17), 4, 64)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits, stats = nnx.merge(graphdef, p).forward(inputs, capacity_factor=2.0)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return ce + 0.01 * stats.aux_loss.sum(), ce
    (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, ce

  losses = []
  for _ in range(150):
    params, opt_state, ce = step(params, opt_state)
    losses.append(float(ce))
  assert losses[0] > 3.5
  # Adam at this learning rate spikes now and then as routing flips (one spike lands on the
  # last step on some CPUs): the model has learned the batch when the recent steps reach it.
  assert min(losses[-10:]) < 0.1
