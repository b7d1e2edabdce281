"""Router math for sparse MoE layers: probabilities, top-k gates, auxiliary losses, capacity.

Shape suffixes: G dispatch groups, T tokens per group, E experts, K experts per token.
`mask_GxT` is 1.0 for real tokens and 0.0 for padding; padding never counts in any statistic.
"""

import math

import jax
import jax.numpy as jnp


def router_probabilities(logits_GxTxE: jax.Array) -> jax.Array:
  """Softmax over experts in float32: [G, T, E] -> [G, T, E]."""
  return jax.nn.softmax(logits_GxTxE.astype(jnp.float32), axis=-1)


def top_k_gates(probs_GxTxE: jax.Array, k: int,
                norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k experts per token, best first: -> (weights [G, T, K] f32, experts [G, T, K] i32)."""
  num_experts = probs_GxTxE.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'top_k={k} must be in [1, num_experts={num_experts}]')
  # lax.top_k breaks ties by the lowest index, which is the tie rule the spec fixes.
  weights_GxTxK, experts_GxTxK = jax.lax.top_k(probs_GxTxE.astype(jnp.float32), k)
  if norm_topk_prob:
    weights_GxTxK = weights_GxTxK / jnp.sum(weights_GxTxK, axis=-1, keepdims=True)
  return weights_GxTxK, experts_GxTxK.astype(jnp.int32)


def expert_capacity(tokens_per_group: int, top_k: int, num_experts: int,
                    capacity_factor: float, min_capacity: int) -> int:
  """Slots per expert per group: ceil(cf * T * k / E), >= min_capacity, <= T; cf <= 0: T."""
  if capacity_factor <= 0:
    return tokens_per_group
  # Rounding first keeps e.g. 1.1 * 20 / 2 = 11.000000000000002 from becoming 12.
  capacity = math.ceil(round(capacity_factor * tokens_per_group * top_k / num_experts, 6))
  # A token picks an expert at most once, so an expert never holds more than T tokens of a group.
  return min(max(capacity, min_capacity), tokens_per_group)


def _assignment_counts(experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                       num_experts: int) -> jax.Array:
  """Real assignments per token and expert: [G, T, K] -> [G, T, E] f32 of 0s and 1s."""
  onehot_GxTxE = jnp.sum(jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.float32), axis=-2)
  return onehot_GxTxE * mask_GxT.astype(jnp.float32)[..., None]


def load_balance_loss(probs_GxTxE: jax.Array, experts_GxTxK: jax.Array,
                      mask_GxT: jax.Array) -> jax.Array:
  """Switch loss E * sum_i f_i * P_i per group, averaged over groups with real tokens: -> []."""
  num_experts, k = probs_GxTxE.shape[-1], experts_GxTxK.shape[-1]
  mask_GxT = mask_GxT.astype(jnp.float32)
  real_G = jnp.sum(mask_GxT, axis=-1)
  denom_Gx1 = jnp.maximum(real_G, 1.0)[:, None]
  counts_GxE = jnp.sum(_assignment_counts(experts_GxTxK, mask_GxT, num_experts), axis=1)
  f_GxE = counts_GxE / (k * denom_Gx1)
  p_GxE = jnp.sum(probs_GxTxE.astype(jnp.float32) * mask_GxT[..., None], axis=1) / denom_Gx1
  loss_G = num_experts * jnp.sum(f_GxE * p_GxE, axis=-1)
  # All-padding groups have no routing to balance; counting them as 0 would bias the mean down.
  has_real_G = (real_G > 0).astype(jnp.float32)
  return jnp.sum(loss_G * has_real_G) / jnp.maximum(jnp.sum(has_real_G), 1.0)


def router_z_loss(logits_GxTxE: jax.Array, mask_GxT: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(z)^2: -> [] f32."""
  mask_GxT = mask_GxT.astype(jnp.float32)
  lse_GxT = jax.nn.logsumexp(logits_GxTxE.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse_GxT) * mask_GxT) / jnp.maximum(jnp.sum(mask_GxT), 1.0)


def expert_fraction(experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                    num_experts: int) -> jax.Array:
  """Share of all real assignments (before dropping) per expert: -> [E] f32 summing to 1."""
  counts_E = jnp.sum(_assignment_counts(experts_GxTxK, mask_GxT, num_experts), axis=(0, 1))
  return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
