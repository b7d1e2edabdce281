"""The MoE block equals a per-token loop, in outputs and gradients, with and without drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain.models import routing, routing_stats
from moetrain.models.moe import MoE
from reference_moe import (expert_choice_loop_reference, moe_loop_reference,
                           token_choice_loop_reference)


def moe_config(**moe):
  config = config_lib.default_config().model
  config.d_model, config.d_ff = 8, 12
  config.moe.num_experts, config.moe.top_k, config.moe.min_capacity = 4, 2, 1
  for key, value in moe.items():
    config.moe[key] = value
  return config


def block_and_input(config, seed, batch=4, length=6):
  block = MoE(config, rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 100), (batch, length, config.d_model))
  x = x.at[..., 0].set(3.0)  # a constant feature, so a router column can act as a bias
  mask = np.ones((batch, length), bool)
  mask[-1, -2:] = False  # padding takes no capacity and is not counted
  return block, x, jnp.asarray(mask)


def run(block, x, mask, capacity_factor, **kwargs):
  """The block's output and its statistics as metrics, the losses under their own names."""
  y, stats = block(x, mask, capacity_factor, **kwargs)
  metrics = routing_stats.layer_metrics(stats)
  return y, {'aux_loss': metrics['aux_loss_per_layer'], 'z_loss': metrics['z_loss_per_layer'],
             **metrics}


def starve_expert(block, expert):
  """Make `expert` every token's last choice (it then receives no tokens)."""
  column = jnp.zeros(block.router.shape[0]).at[0].set(-100.0)
  block.router[...] = block.router[...].at[:, expert].set(column)


def reference(block, x, mask, config, capacity):
  g = config.moe.group_size
  b, l, d = x.shape
  y, stats = moe_loop_reference(
      x.reshape(b // g, g * l, d), mask.reshape(b // g, g * l).astype(jnp.float32),
      block.router[...], block.w_gate[...], block.w_up[...], block.w_down[...],
      top_k=config.moe.top_k, norm_topk_prob=config.moe.norm_topk_prob, capacity=capacity)
  return y.reshape(b, l, d), stats


@pytest.mark.parametrize('dispatch', ['capacity', 'einsum'])
@pytest.mark.parametrize('capacity_factor, group_size, top_k', [
    (0.5, 1, 2),   # heavy overflow: many assignments dropped
    (1.0, 2, 1),   # groups of two sequences
    (0.0, 1, 3),   # dropless
])
def test_block_equals_per_token_loop(dispatch, capacity_factor, group_size, top_k):
  config = moe_config(dispatch=dispatch, group_size=group_size, top_k=top_k)
  block, x, mask = block_and_input(config, seed=top_k)
  starve_expert(block, expert=3)
  capacity = routing.expert_capacity(group_size * x.shape[1], top_k, 4, capacity_factor, 1)

  y, stats = run(block, x, mask, capacity_factor)
  y_ref, ref = reference(block, x, mask, config, capacity)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for key in ('aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
    np.testing.assert_allclose(stats[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert float(stats['expert_fraction'][3]) == 0.0  # the starved expert got nothing
  if capacity_factor == 0.5:
    assert float(stats['dropped_fraction']) > 0.2
  else:
    assert capacity_factor > 0.0 or float(stats['dropped_fraction']) == 0.0


def test_dropped_tokens_get_no_expert_output():
  config = moe_config(top_k=1)
  block, x, mask = block_and_input(config, seed=5)
  block.router[...] = jnp.zeros_like(block.router[...]).at[:, 0].set(1.0)
  x = jnp.abs(x)  # every token prefers expert 0, which holds only `capacity` of them
  y, stats = block(x, mask, capacity_factor=0.25)
  capacity = routing.expert_capacity(x.shape[1], 1, 4, 0.25, 1)
  assert capacity == 1
  # Only the first token of each sequence fits; the rest pass through the residual untouched.
  assert np.all(np.asarray(y[:, 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(y[:, 0])) > 0.0)


@pytest.mark.parametrize('dispatch', ['capacity', 'einsum'])
def test_block_gradients_equal_per_token_loop(dispatch):
  config = moe_config(dispatch=dispatch)
  block, x, mask = block_and_input(config, seed=7)
  starve_expert(block, expert=2)
  capacity = routing.expert_capacity(x.shape[1], 2, 4, 0.75, 1)
  graphdef, params = nnx.split(block)

  def block_loss(params, x):
    y, stats = run(nnx.merge(graphdef, params), x, mask, 0.75)
    return jnp.sum(jnp.sin(y)) + stats['aux_loss'] + stats['z_loss']

  def reference_loss(params, x):
    model = nnx.merge(graphdef, params)
    y, stats = reference(model, x, mask, config, capacity)
    return jnp.sum(jnp.sin(y)) + stats['aux_loss'] + stats['z_loss']

  grads = jax.grad(block_loss, argnums=(0, 1))(params, x)
  ref_grads = jax.grad(reference_loss, argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
  assert float(jnp.abs(grads[0]['router'][...]).sum()) > 0


def swiglu_by_hand(x, mlp):
  h = jax.nn.silu(x @ mlp.w_gate[...]) * (x @ mlp.w_up[...])
  return h @ mlp.w_down[...]


@pytest.mark.parametrize('gated', [False, True])
def test_shared_experts_add_to_the_routed_output(gated):
  config = moe_config(num_shared_experts=2, d_shared_expert=5, shared_expert_gate=gated,
                      dispatch='capacity')
  block, x, mask = block_and_input(config, seed=11)
  assert block.shared.w_up.shape == (8, 10)  # two experts of width 5, side by side
  y, _ = block(x, mask, 0.0)
  routed, _ = reference(block, x, mask, config, capacity=x.shape[1])
  shared = swiglu_by_hand(x, block.shared)
  if gated:
    shared = jax.nn.sigmoid(x @ block.shared_gate[...]) * shared
  np.testing.assert_allclose(y, routed + shared, rtol=1e-5, atol=1e-6)

  def block_loss(x):
    return jnp.sum(jnp.sin(block(x, mask, 0.0)[0]))

  def reference_loss(x):
    shared = swiglu_by_hand(x, block.shared)
    if gated:
      shared = jax.nn.sigmoid(x @ block.shared_gate[...]) * shared
    return jnp.sum(jnp.sin(reference(block, x, mask, config, capacity=x.shape[1])[0] + shared))

  np.testing.assert_allclose(jax.grad(block_loss)(x), jax.grad(reference_loss)(x),
                             rtol=1e-4, atol=1e-6)


def test_sigmoid_router_with_bias_and_groups_matches_the_loop_reference():
  config = moe_config(router='sigmoid', num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                      routed_scaling_factor=2.5, bias_update_rate=0.01, dispatch='capacity')
  block, x, mask = block_and_input(config, seed=13)
  block.router_bias[...] = jnp.linspace(-0.2, 0.2, 8)
  y, stats = run(block, x, mask, 1.0, train=True)
  scores = jax.nn.sigmoid(jnp.einsum('btd,de->bte', x, block.router[...]))
  biased = np.asarray(scores + jnp.linspace(-0.2, 0.2, 8))
  experts = np.zeros(x.shape[:2] + (2,), np.int32)
  for b, t in np.ndindex(*x.shape[:2]):
    group_scores = [np.sort(biased[b, t, 2 * g:2 * g + 2]).sum() for g in range(4)]
    allowed = np.argsort(-np.asarray(group_scores), kind='stable')[:2]
    candidates = [e for e in range(8) if e // 2 in allowed]
    experts[b, t] = sorted(candidates, key=lambda e: (-biased[b, t, e], e))[:2]
  chosen = np.take_along_axis(np.asarray(scores), experts, axis=-1)
  gates = 2.5 * chosen / chosen.sum(-1, keepdims=True)  # the bias never enters the weights
  capacity = routing.expert_capacity(x.shape[1], 2, 8, 1.0, 1)
  y_ref, _ = token_choice_loop_reference(x, mask.astype(jnp.float32), jnp.asarray(experts),
                                         jnp.asarray(gates), block.w_gate[...], block.w_up[...],
                                         block.w_down[...], capacity=capacity)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  # The block routes with the bias and leaves it: the step moves it once, by the step's load.
  np.testing.assert_allclose(block.router_bias[...], np.linspace(-0.2, 0.2, 8), atol=1e-7)
  np.testing.assert_allclose(stats['router_bias'], np.linspace(-0.2, 0.2, 8), atol=1e-7)


def test_expert_choice_block_matches_the_loop_reference():
  config = moe_config(router='expert_choice', dispatch='capacity')
  block, x, mask = block_and_input(config, seed=17)
  y, stats = run(block, x, mask, 1.0)
  probs = jax.nn.softmax(jnp.einsum('btd,de->bte', x, block.router[...]), axis=-1)
  capacity = routing.expert_capacity(x.shape[1], 2, 4, 1.0, 1)
  tokens = np.full((x.shape[0], 4, capacity), x.shape[1])
  weights = np.zeros((x.shape[0], 4, capacity), np.float32)
  for b in range(x.shape[0]):
    for e in range(4):
      real = [t for t in range(x.shape[1]) if mask[b, t]]
      best = sorted(real, key=lambda t: (-float(probs[b, t, e]), t))[:capacity]
      tokens[b, e, :len(best)] = best
      weights[b, e, :len(best)] = [float(probs[b, t, e]) for t in best]
  y_ref = expert_choice_loop_reference(x, tokens, weights, block.w_gate[...], block.w_up[...],
                                       block.w_down[...])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats['expert_fraction'].sum()), 1.0, rtol=1e-6)


@pytest.mark.parametrize('threshold, loop_k', [(1.0, 4), (1e-6, 1)])
def test_top_p_at_its_limits_equals_the_per_token_loop(threshold, loop_k):
  """router=top_p with the cap at E: p = 1 takes every expert (softmax top-E), a tiny p the
  most probable one only (top-1); dropless, values and gradients. The balance loss counts the
  cap's k·T slots, so at top-1 it is the loop's over E."""
  config = moe_config(router='top_p', top_p_threshold=threshold, top_k=4, norm_topk_prob=False)
  loop_config = moe_config(top_k=loop_k, norm_topk_prob=False)
  block, x, mask = block_and_input(config, seed=5, batch=2, length=4)
  graphdef, params = nnx.split(block)

  def losses(params, x, forward):
    y, stats = forward(nnx.merge(graphdef, params), x)
    return jnp.sum(jnp.sin(y)) + stats['z_loss'], (y, stats['aux_loss'])

  top_p = lambda model, x: run(model, x, mask, 0.0)
  loop = lambda model, x: reference(model, x, mask, loop_config, x.shape[1])  # no drops
  grads, (y, aux) = jax.grad(losses, argnums=(0, 1), has_aux=True)(params, x, top_p)
  ref_grads, (ref_y, ref_aux) = jax.grad(losses, argnums=(0, 1), has_aux=True)(params, x, loop)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux * 4 / loop_k, ref_aux, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
  experts = run(block, x, mask, 0.0)[1]['experts_per_token']
  assert float(experts) == loop_k


def _softmax_top_k(block, x, k):
  """The block's softmax top-k choices and renormalised gates, computed here: [B, L, K] each."""
  probs = jax.nn.softmax(jnp.einsum('btd,de->bte', x, block.router[...]), axis=-1)
  gates, experts = jax.lax.top_k(probs, k)
  return np.asarray(experts), gates / gates.sum(-1, keepdims=True)


@pytest.mark.parametrize('dispatch, capacity_factor', [
    ('capacity', 0.0),  # dropless: every assignment, two rows of one expert for a token
    ('capacity', 1.5),  # capacity buffers that overflow, duplicates each taking a slot
    ('einsum', 1.5),
])
def test_merged_experts_follow_the_router_map_like_the_loop(dispatch, capacity_factor):
  config = moe_config(num_experts=3, router_outputs=5, dispatch=dispatch)
  block, x, mask = block_and_input(config, seed=21)
  block.expert_map[...] = jnp.array([0, 1, 2, 1, 0], jnp.int32)
  # Outputs 1 and 3 (both expert 1) get equal, favoured scores: most tokens choose both.
  column = block.router[...][:, 1].at[0].set(2.0)
  block.router[...] = block.router[...].at[:, 1].set(column).at[:, 3].set(column)
  y, metrics = run(block, x, mask, capacity_factor)
  experts, gates = _softmax_top_k(block, x, 2)
  physical = np.asarray(block.expert_map[...])[experts]
  assert np.any(physical[..., 0] == physical[..., 1])  # the case the map exists for
  capacity = (2 * x.shape[1] if capacity_factor == 0 else
              routing.expert_capacity(x.shape[1], 2, 3, capacity_factor, 1, copies=2))
  y_ref, info = token_choice_loop_reference(x, mask.astype(jnp.float32), jnp.asarray(physical),
                                            gates, block.w_gate[...], block.w_up[...],
                                            block.w_down[...], capacity=capacity)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert (info['dropped_fraction'] > 0) == (capacity_factor > 0)
  # Statistics stay per router output: 5 columns.
  assert metrics['expert_fraction'].shape == (5,)


def test_skip_ratio_skips_small_later_gates_outside_training_only():
  plain = moe_config(num_experts=4)
  skipping = moe_config(num_experts=4, skip_ratio=0.6)
  block, x, mask = block_and_input(plain, seed=23)
  skip_block, _, _ = block_and_input(skipping, seed=23)
  for b in (block, skip_block):  # a sharper router: gates far from equal
    b.router[...] = 20.0 * b.router[...]
  experts, gates = _softmax_top_k(block, x, 2)
  skipped = np.asarray(gates[..., 1] < 0.6 * gates[..., 0])
  assert skipped.any() and not skipped.all()
  # A skipped second choice: the null index 4 (no expert computes it) with gate 0.
  second_skipped = skipped[..., None] & (np.arange(2) == 1)
  kept_experts = jnp.asarray(np.where(second_skipped, 4, experts))
  kept_gates = jnp.where(second_skipped, 0.0, gates)
  for cf in (0.0, 2.0):
    y_plain, _ = run(block, x, mask, cf)
    y_skip, metrics = run(skip_block, x, mask, cf)
    y_ref, _ = token_choice_loop_reference(
        x, mask.astype(jnp.float32), kept_experts, kept_gates, block.w_gate[...],
        block.w_up[...], block.w_down[...], capacity=2 * x.shape[1])
    np.testing.assert_allclose(y_skip, y_ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_skip, y_plain, atol=1e-4)
    real = np.asarray(mask)
    np.testing.assert_allclose(metrics['experts_per_token'],
                               2 - skipped[real].mean(), rtol=1e-6)
  # Training computes every choice: the ratio changes nothing there.
  np.testing.assert_array_equal(run(skip_block, x, mask, 2.0, train=True)[0],
                                run(block, x, mask, 2.0, train=True)[0])
