"""MoE feed-forward block: router, routed SwiGLU experts, optional shared experts.

The math lives in pure functions (`routing` chooses, `pipeline` computes the chosen experts,
`routing_stats` reports); this module holds the parameters, arranges tokens into dispatch
groups of whole sequences (so capacity and dropping never depend on how the batch is spread
over devices) and picks the routing scheme the config names.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import fp8, pipeline, routing, routing_stats, two_level
from moetrain.models.layers import param
from moetrain.models.mlp import MLP
from moetrain.parallel import exchange, sharding

# `dispatch=auto` builds capacity buffers with row gathers ('capacity') on every platform:
# faster than the one-hot einsum on CPU (`tools/benchmark.py moe-layer`, docs/benchmarks.md)
# and on an H100 in the project's GPU reference figures. TPU is not measured yet.
AUTO_DISPATCH = {'cpu': 'capacity', 'gpu': 'capacity', 'tpu': 'capacity'}


def resolve_dispatch(name: str) -> str:
  """The capacity-buffer backend to run: `name`, or this platform's measured best for 'auto'."""
  return AUTO_DISPATCH.get(jax.default_backend(), 'capacity') if name == 'auto' else name


class RouterBias(nnx.Variable):
  """Auxiliary-loss-free balancing bias: changes which experts are chosen, gets no gradient."""


class ExpertMap(nnx.Variable):
  """Merged experts: router output r is computed by expert map[r] (int32 [R]); never trained."""


def router_outputs(moe) -> int:
  """R, the router's real outputs: one per expert unless merged experts share some."""
  return moe.router_outputs or moe.num_experts


class MoE(nnx.Module):
  """`num_experts` SwiGLU experts of width `d_expert`, each token sent to its top-k."""

  def __init__(self, config, *, rngs: nnx.Rngs, mesh=None):
    moe = config.moe
    d, e, f = config.d_model, moe.num_experts, moe.d_expert or config.d_ff
    r = router_outputs(moe)
    self.router = param(rngs, (d, r + moe.num_null_experts), ('embed', 'router'), config)
    self.w_gate = param(rngs, (e, d, f), sharding.EXPERT_IN_AXES, config)
    self.w_up = param(rngs, (e, d, f), sharding.EXPERT_IN_AXES, config)
    self.w_down = param(rngs, (e, f, d), sharding.EXPERT_OUT_AXES, config)
    if moe.bias_update_rate:
      self.router_bias = RouterBias(jnp.zeros((r,), jnp.float32), out_sharding=(None,),
                                    eager_sharding=False)
    if r > e:
      # The compression tool writes the real map; a fresh model shares experts round-robin.
      self.expert_map = ExpertMap(jnp.arange(r, dtype=jnp.int32) % e, out_sharding=(None,),
                                  eager_sharding=False)
    if moe.num_shared_experts:
      width = moe.num_shared_experts * (moe.d_shared_expert or f)
      # n shared SwiGLU experts add up to one SwiGLU with their hidden units side by side.
      self.shared = MLP(config, width, rngs=rngs)
      if moe.shared_expert_gate:
        self.shared_gate = param(rngs, (d, 1), ('embed', None), config)
    self.moe = ml_collections.FrozenConfigDict(moe)  # hashable, so the graphdef is too
    self.dtype = jnp.dtype(config.dtype)
    self.fp8 = config.fp8
    self.exchange = two_level.node_aware(exchange.for_mesh(mesh, moe), moe)
    # 0 (auto) is set from the cost model before the trainer builds a model; a model built
    # without that step exchanges in one chunk. Chunks of the whole block (`Block`) reach this
    # layer one at a time, each exchanged whole.
    self.chunks = 1 if moe.exchange_overlap == 'block' else moe.exchange_chunks or 1
    self.mesh = mesh

  def __call__(self, x_BxLxD, mask_BxL, capacity_factor: float, *, train: bool = False,
               rng=None):
    """Returns the MoE output [B, L, D] and this layer's `routing_stats.RoutingStats`.

    `capacity_factor` 0 routes dropless. In training (`train=True`) the router input is
    jittered when configured (needs `rng`). The balancing bias is updated once per step, from
    the step's load (`steps.balance_biases`), not here.
    """
    moe = self.moe
    if not capacity_factor >= 0:
      raise ValueError(f'capacity_factor={capacity_factor} must be >= 0 (0: dropless)')
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

    backend = resolve_dispatch(moe.dispatch)
    weights = tuple(fp8.weight(self.fp8, w, self.dtype)
                    for w in (self.w_gate, self.w_up, self.w_down))
    bias_E = self.router_bias[...] if moe.bias_update_rate else None
    if moe.router == 'expert_choice':
      # Expert choice has no dropless form: capacity factor 0 lets every expert take every token.
      capacity = routing.expert_capacity(tokens, moe.top_k, moe.num_experts, capacity_factor,
                                         moe.min_capacity)
      tokens_GxExC, gates_GxExC = sharding.on_local_groups(
          self.mesh, lambda p, m: routing.expert_choice(p, capacity, m), probs_GxTxR, mask_GxT)
      y_GxTxD = pipeline.expert_choice(x_GxTxD, tokens_GxExC, gates_GxExC, weights,
                                       backend=backend, exchange=self.exchange,
                                       chunks=self.chunks, fp8=self.fp8)
      stats = routing_stats.expert_choice(probs_GxTxR=probs_GxTxR, logits_GxTxR=logits_GxTxR,
                                          tokens_GxExC=tokens_GxExC, gates_GxExC=gates_GxExC,
                                          mask_GxT=mask_GxT)
    else:
      if moe.router == 'top_p':
        experts_GxTxK, gates_GxTxK = sharding.on_local_groups(
            self.mesh, lambda p: routing.top_p(p, moe.top_p_threshold, moe.top_k,
                                               normalize=moe.norm_topk_prob), probs_GxTxR)
        gates_GxTxK = gates_GxTxK * moe.routed_scaling_factor
      else:
        experts_GxTxK = sharding.on_local_groups(
            self.mesh, lambda s: routing.select_experts(s, moe.top_k, bias_E=bias_E,
                                                        num_groups=moe.num_groups,
                                                        topk_groups=moe.topk_groups),
            scores_GxTxR)
        gates_GxTxK = routing.gate_weights(scores_GxTxR, experts_GxTxK,
                                           normalize=moe.norm_topk_prob,
                                           scaling=moe.routed_scaling_factor,
                                           num_null_experts=moe.num_null_experts)
      if moe.skip_ratio and not train:
        experts_GxTxK, gates_GxTxK = routing.skip_small_gates(
            experts_GxTxK, gates_GxTxK, moe.skip_ratio, skipped=scores_GxTxR.shape[-1])
      priority_GxT = (jnp.max(probs_GxTxR, axis=-1) if moe.drop_policy == 'priority'
                      else None)
      outputs = router_outputs(moe)
      capacity = (None if capacity_factor == 0 else
                  routing.expert_capacity(tokens, moe.top_k, moe.num_experts, capacity_factor,
                                          moe.min_capacity,
                                          copies=min(moe.top_k, outputs - moe.num_experts + 1)))
      physical_GxTxK = (routing.to_physical(experts_GxTxK, self.expert_map[...], moe.num_experts)
                        if outputs > moe.num_experts else experts_GxTxK)
      y_GxTxD, kept_GxTxK = pipeline.token_choice(
          x_GxTxD, physical_GxTxK, gates_GxTxK, mask_GxT, weights, num_experts=moe.num_experts,
          capacity=capacity, backend=backend, priority_GxT=priority_GxT, exchange=self.exchange,
          chunks=self.chunks, fp8=self.fp8)
      aux_loss = routing.load_balance_loss(probs_GxTxR, experts_GxTxK, mask_GxT,
                                           mode=moe.aux_loss, seq_len=l,
                                           num_null_experts=moe.num_null_experts)
      stats = routing_stats.token_choice(probs_GxTxR=probs_GxTxR, logits_GxTxR=logits_GxTxR,
                                         experts_GxTxK=experts_GxTxK, kept_GxTxK=kept_GxTxK,
                                         gates_GxTxK=gates_GxTxK, mask_GxT=mask_GxT,
                                         num_experts=outputs, aux_loss=aux_loss, bias_E=bias_E)
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
