"""MoE feed-forward block: the parameters of a float32 router and SwiGLU experts.

The math lives in pure functions (`routing`, `dispatch.moe_ffn`); this module holds the
parameters and arranges tokens into dispatch groups of whole sequences, so capacity and
dropping never depend on how the batch is spread over devices.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import dispatch, routing
from moetrain.models.layers import param


class MoE(nnx.Module):
  """`num_experts` SwiGLU experts of width `d_expert`, each token sent to its top-k."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    moe = config.moe
    d, e, f = config.d_model, moe.num_experts, moe.d_expert or config.d_ff
    self.router = param(rngs, (d, e), ('embed', 'router'), config)
    self.w_gate = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), config)
    self.w_up = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), config)
    self.w_down = param(rngs, (e, f, d), ('expert', 'mlp', 'embed'), config)
    self.moe = ml_collections.FrozenConfigDict(moe)  # hashable, so the graphdef is too
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x_BxLxD, mask_BxL, capacity_factor: float):
    """Returns the expert output [B, L, D] and this layer's routing statistics.

    `capacity_factor <= 0` routes dropless.
    """
    moe = self.moe
    b, l, d = x_BxLxD.shape
    groups, tokens = b // moe.group_size, moe.group_size * l
    capacity = routing.expert_capacity(tokens, moe.top_k, moe.num_experts, capacity_factor,
                                       moe.min_capacity)
    cast = lambda p: p[...].astype(self.dtype)
    y_GxTxD, stats = dispatch.moe_ffn(
        x_BxLxD.reshape(groups, tokens, d), self.router[...], cast(self.w_gate),
        cast(self.w_up), cast(self.w_down), top_k=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob, capacity=capacity, backend=moe.dispatch,
        mask_GxT=mask_BxL.reshape(groups, tokens).astype(jnp.float32))
    if moe.aux_loss == 'none':
      stats['aux_loss'] = jnp.zeros_like(stats['aux_loss'])
    return y_GxTxD.reshape(b, l, d), stats
