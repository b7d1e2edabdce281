"""Dropless top-k experts: sort every assignment by expert, grouped matmuls, unsort.

Shape suffixes as in `dispatch`, plus M = G·T·K assignments. The grouped matmul kernel is
picked by platform in `grouped_matmul`: megablox on TPU, tokamax's `ragged_dot` on GPU when
tokamax is installed, XLA's `jax.lax.ragged_dot` otherwise (correct everywhere, but slow: see
PERFORMANCE.md).
"""

import jax
import jax.numpy as jnp

from moetrain.models import grouped_matmul


def ragged_dot(lhs_MxD: jax.Array, rhs_ExDxF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """Consecutive row groups of lhs times their group's matrix, by the platform's kernel: -> [M, F].

  Rows past sum(group_sizes) belong to no group: zero, with a zero gradient.
  """
  return grouped_matmul.ragged_dot(lhs_MxD, rhs_ExDxF, group_sizes_E)


def dropless_ffn(x_GxTxD: jax.Array, experts_GxTxK: jax.Array, weights_GxTxK: jax.Array,
                 mask_GxT: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                 w_down_ExFxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Every real token's real-expert choices, none dropped: -> (y [G, T, D], kept [G, T, K])."""
  num_groups, tokens, d_model = x_GxTxD.shape
  k = experts_GxTxK.shape[-1]
  num_experts = w_gate_ExDxF.shape[0]
  num_assignments = num_groups * tokens * k
  dtype = x_GxTxD.dtype
  kept_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  kept_M = kept_GxTxK.reshape(-1)

  # Padding and null assignments get the key E and sort behind every expert's group.
  expert_M = jnp.where(kept_M, experts_GxTxK.reshape(-1), num_experts)
  order_M = jnp.argsort(expert_M, stable=True)
  group_sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  # Sentinel row G·T reads zeros, and its gradient falls off the end instead of reaching x.
  token_M = jnp.where(kept_M, jnp.arange(num_assignments) // k, num_groups * tokens)
  x_MxD = jnp.take(x_GxTxD.reshape(-1, d_model), token_M[order_M], axis=0, mode='fill',
                   fill_value=0)

  gate_MxF = ragged_dot(x_MxD, w_gate_ExDxF.astype(dtype), group_sizes_E)
  up_MxF = ragged_dot(x_MxD, w_up_ExDxF.astype(dtype), group_sizes_E)
  # Rows of no group (padding and null assignments, sorted last) come out zero.
  y_MxD = ragged_dot(jax.nn.silu(gate_MxF) * up_MxF, w_down_ExFxD.astype(dtype), group_sizes_E)

  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(num_assignments,
                                                                  dtype=order_M.dtype))
  y_GxTxKxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(num_groups, tokens, k, d_model)
  y_GxTxD = jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, weights_GxTxK.astype(jnp.float32))
  return y_GxTxD.astype(dtype), kept_GxTxK
