"""MoE feed-forward block: router, routed SwiGLU experts, optional shared experts.

The math lives in pure functions (`routing`, `dispatch`); this module holds the parameters,
arranges tokens into dispatch groups of whole sequences (so capacity and dropping never depend
on how the batch is spread over devices) and picks the routing scheme the config names.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import dispatch, routing
from moetrain.models.layers import param
from moetrain.models.mlp import MLP
from moetrain.parallel import expert_parallel

# `dispatch=auto` per platform, from `tools/benchmark.py moe-layer` (docs/benchmarks.md):
# capacity buffers beat the one-hot einsum and ragged_dot on CPU, and on an H100 in the
# project's GPU reference figures. TPU is not measured yet; capacity is its safe default.
AUTO_DISPATCH = {'cpu': 'capacity', 'gpu': 'capacity', 'tpu': 'capacity'}


def resolve_dispatch(name: str) -> str:
  """The dispatch backend to run: `name`, or this platform's measured best for 'auto'."""
  return AUTO_DISPATCH.get(jax.default_backend(), 'capacity') if name == 'auto' else name


class RouterBias(nnx.Variable):
  """Auxiliary-loss-free balancing bias: changes which experts are chosen, gets no gradient."""


class MoE(nnx.Module):
  """`num_experts` SwiGLU experts of width `d_expert`, each token sent to its top-k."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    moe = config.moe
    d, e, f = config.d_model, moe.num_experts, moe.d_expert or config.d_ff
    self.router = param(rngs, (d, e + moe.num_null_experts), ('embed', 'router'), config)
    self.w_gate = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), config)
    self.w_up = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), config)
    self.w_down = param(rngs, (e, f, d), ('expert', 'mlp', 'embed'), config)
    if moe.bias_update_rate:
      self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                    eager_sharding=False)
    if moe.num_shared_experts:
      width = moe.num_shared_experts * (moe.d_shared_expert or f)
      # n shared SwiGLU experts add up to one SwiGLU with their hidden units side by side.
      self.shared = MLP(config, width, rngs=rngs)
      if moe.shared_expert_gate:
        self.shared_gate = param(rngs, (d, 1), ('embed', None), config)
    self.moe = ml_collections.FrozenConfigDict(moe)  # hashable, so the graphdef is too
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x_BxLxD, mask_BxL, capacity_factor: float, *, train: bool = False,
               rng=None):
    """Returns the MoE output [B, L, D] and this layer's routing statistics.

    `capacity_factor <= 0` routes dropless. In training (`train=True`) the router input is
    jittered when configured (needs `rng`) and the balancing bias is updated from this batch's
    load.
    """
    moe = self.moe
    b, l, d = x_BxLxD.shape
    groups, tokens = b // moe.group_size, moe.group_size * l
    x_GxTxD = x_BxLxD.reshape(groups, tokens, d)
    mask_GxT = mask_BxL.reshape(groups, tokens).astype(jnp.float32)

    router_in_GxTxD = x_GxTxD.astype(jnp.float32)
    if train and moe.jitter:
      router_in_GxTxD = routing.jitter(router_in_GxTxD, rng, moe.jitter)
    logits_GxTxR = jnp.einsum('gtd,dr->gtr', router_in_GxTxD,
                              self.router[...].astype(jnp.float32))
    if moe.router == 'sigmoid':
      scores_GxTxR = routing.sigmoid_scores(logits_GxTxR)
      probs_GxTxR = routing.normalized_scores(scores_GxTxR)
    else:
      probs_GxTxR = scores_GxTxR = routing.router_probabilities(logits_GxTxR)

    capacity = routing.expert_capacity(tokens, moe.top_k, moe.num_experts, capacity_factor,
                                       moe.min_capacity)
    backend = resolve_dispatch(moe.dispatch)
    weights = tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    bias_E = self.router_bias[...] if moe.bias_update_rate else None
    if moe.router == 'expert_choice':
      tokens_GxExC, gates_GxExC = routing.expert_choice(probs_GxTxR, capacity, mask_GxT)

      def ffn(arrays, weights, expert_fn):
        return dispatch.expert_choice_ffn(*arrays, *weights, backend=backend,
                                          expert_fn=expert_fn)
      y_GxTxD = expert_parallel.run_experts(ffn, (x_GxTxD, tokens_GxExC, gates_GxExC), weights)
      stats = self._expert_choice_stats(tokens_GxExC, gates_GxExC, mask_GxT)
    else:
      experts_GxTxK = routing.select_experts(scores_GxTxR, moe.top_k, bias_E=bias_E,
                                             num_groups=moe.num_groups,
                                             topk_groups=moe.topk_groups)
      gates_GxTxK = routing.gate_weights(scores_GxTxR, experts_GxTxK,
                                         normalize=moe.norm_topk_prob,
                                         scaling=moe.routed_scaling_factor,
                                         num_null_experts=moe.num_null_experts)
      priority_GxT = (jnp.max(probs_GxTxR, axis=-1) if moe.drop_policy == 'priority'
                      else None)
      if backend == 'dropless' and expert_parallel.expert_mesh() is not None:
        y_GxTxD, kept_GxTxK = expert_parallel.run_dropless(
            x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, weights, num_experts=moe.num_experts)
      else:
        def ffn(arrays, weights, expert_fn):
          x, experts, gates, mask, priority = arrays
          return dispatch.token_choice_ffn(x, experts, gates, mask, *weights,
                                           capacity=capacity, backend=backend,
                                           priority_GxT=priority, expert_fn=expert_fn,
                                           num_experts=moe.num_experts)
        y_GxTxD, kept_GxTxK = expert_parallel.run_experts(
            ffn, (x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, priority_GxT), weights)
      stats = self._token_choice_stats(probs_GxTxR, experts_GxTxK, kept_GxTxK, mask_GxT, l)
      if train and moe.bias_update_rate:
        load_E = routing.expert_load(experts_GxTxK, mask_GxT, moe.num_experts)
        self.router_bias[...] = routing.update_bias(bias_E, load_E, moe.bias_update_rate)

    stats['z_loss'] = routing.router_z_loss(logits_GxTxR, mask_GxT)
    stats['router_entropy'] = routing.router_entropy(probs_GxTxR, mask_GxT)
    # The bias that routed this batch (the update above applies from the next one).
    stats['router_bias'] = (jnp.zeros((moe.num_experts,), jnp.float32) if bias_E is None
                            else bias_E)
    y_BxLxD = y_GxTxD.reshape(b, l, d)
    if moe.num_shared_experts:
      y_BxLxD = y_BxLxD + self._shared(x_BxLxD)
    return y_BxLxD, stats

  def _shared(self, x_BxLxD):
    shared_BxLxD = self.shared(x_BxLxD)
    if self.moe.shared_expert_gate:
      gate_BxLx1 = jax.nn.sigmoid(x_BxLxD @ self.shared_gate[...].astype(self.dtype))
      shared_BxLxD = gate_BxLx1 * shared_BxLxD
    return shared_BxLxD

  def _token_choice_stats(self, probs_GxTxR, experts_GxTxK, kept_GxTxK, mask_GxT, seq_len):
    moe = self.moe
    aux_loss = routing.load_balance_loss(probs_GxTxR, experts_GxTxK, mask_GxT,
                                         mode=moe.aux_loss, seq_len=seq_len,
                                         num_null_experts=moe.num_null_experts)
    load_E = routing.expert_load(experts_GxTxK, mask_GxT, moe.num_experts)
    return {
        'aux_loss': aux_loss,
        'expert_fraction': routing.expert_fraction(experts_GxTxK, mask_GxT, moe.num_experts),
        'max_load': routing.max_over_mean(load_E),
        'dropped_fraction': dispatch.dropped_fraction(kept_GxTxK, mask_GxT,
                                                      experts_GxTxK=experts_GxTxK,
                                                      num_experts=moe.num_experts),
        'experts_per_token': routing.mean_real_experts(experts_GxTxK, mask_GxT,
                                                       moe.num_experts),
    }

  def _expert_choice_stats(self, tokens_GxExC, gates_GxExC, mask_GxT):
    """Every expert fills its capacity, so there is no imbalance to penalise; `dropped_fraction`
    is the share of real tokens that no expert chose."""
    groups, tokens = mask_GxT.shape
    chosen_GxS = (gates_GxExC > 0).astype(jnp.float32).reshape(groups, -1)
    load_E = (gates_GxExC > 0).astype(jnp.float32).sum(axis=(0, 2))
    # Sentinel slots point at token index T, one past the end, and are sliced off.
    picks_GxT = jnp.zeros((groups, tokens + 1)).at[
        jnp.arange(groups)[:, None], tokens_GxExC.reshape(groups, -1)].add(chosen_GxS)[:, :tokens]
    real_tokens = jnp.maximum(mask_GxT.sum(), 1.0)
    return {
        'aux_loss': jnp.zeros((), jnp.float32),
        'expert_fraction': load_E / jnp.maximum(load_E.sum(), 1.0),
        'max_load': routing.max_over_mean(load_E),
        'dropped_fraction': ((picks_GxT == 0) * mask_GxT).sum() / real_tokens,
        'experts_per_token': (picks_GxT * mask_GxT).sum() / real_tokens,
    }
