"""Capacity-limited token dispatch and combine for sparse MoE layers, and a SwiGLU MoE layer.

Shape suffixes: G dispatch groups, T tokens per group, D model dim, F expert hidden dim,
E experts, C capacity (slots per expert per group), K experts per token. Two interchangeable
backends: 'einsum' (GShard one-hot [G, T, E, C] tensors, the readable reference) and
'capacity' (index gather/scatter without any [T, E, C] tensor, the fast path).
"""

import jax
import jax.numpy as jnp

from moetrain.models import routing

BACKENDS = ('einsum', 'capacity')


def _check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f'unknown MoE dispatch backend {backend!r}; expected one of {BACKENDS}')


def assign_slots(experts_GxTxK: jax.Array, mask_GxT: jax.Array, num_experts: int,
                 capacity: int) -> tuple[jax.Array, jax.Array]:
  """Buffer position of each assignment, 'position' order: -> (slots i32, kept bool) [G, T, K]."""
  num_groups, tokens, k = experts_GxTxK.shape
  real_GxT = mask_GxT > 0
  onehot_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.int32)
  onehot_GxTxKxE = onehot_GxTxKxE * real_GxT[..., None, None].astype(jnp.int32)
  # Choice-major order, so every token's first choice is served before any second choice.
  order_GxNxE = onehot_GxTxKxE.transpose(0, 2, 1, 3).reshape(num_groups, k * tokens, num_experts)
  earlier_GxNxE = jnp.cumsum(order_GxNxE, axis=1) - order_GxNxE
  slots_GxN = jnp.sum(earlier_GxNxE * order_GxNxE, axis=-1)
  slots_GxTxK = slots_GxN.reshape(num_groups, k, tokens).transpose(0, 2, 1).astype(jnp.int32)
  kept_GxTxK = real_GxT[..., None] & (slots_GxTxK < capacity)
  return slots_GxTxK, kept_GxTxK


def dropped_fraction(kept_GxTxK: jax.Array, mask_GxT: jax.Array) -> jax.Array:
  """Dropped real assignments / all real assignments: -> [] f32."""
  real_GxTxK = jnp.broadcast_to((mask_GxT > 0)[..., None], kept_GxTxK.shape)
  dropped = jnp.sum(real_GxTxK & ~kept_GxTxK).astype(jnp.float32)
  return dropped / jnp.maximum(jnp.sum(real_GxTxK), 1).astype(jnp.float32)


def _flat_slots(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity):
  """Row of each assignment in a flat [G, E * C] buffer, E * C (out of range) if not kept."""
  flat_GxTxK = jnp.where(kept_GxTxK, experts_GxTxK * capacity + slots_GxTxK,
                         num_experts * capacity)
  return flat_GxTxK.reshape(experts_GxTxK.shape[0], -1)


def _onehot_routing(experts_GxTxK, slots_GxTxK, scale_GxTxK, num_experts, capacity, dtype):
  """GShard routing tensor: sum over k of scale * onehot(expert) x onehot(slot): -> [G, T, E, C]."""
  expert_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=dtype) * scale_GxTxK[..., None]
  slot_GxTxKxC = jax.nn.one_hot(slots_GxTxK, capacity, dtype=dtype)
  return jnp.einsum('gtke,gtkc->gtec', expert_GxTxKxE, slot_GxTxKxC)


def dispatch(x_GxTxD: jax.Array, experts_GxTxK: jax.Array, slots_GxTxK: jax.Array,
             kept_GxTxK: jax.Array, num_experts: int, capacity: int, backend: str) -> jax.Array:
  """Each expert's capacity buffer of its kept tokens, empty slots zero: -> [G, E, C, D]."""
  _check_backend(backend)
  num_groups, tokens, d_model = x_GxTxD.shape
  if backend == 'einsum':
    dispatch_GxTxExC = _onehot_routing(experts_GxTxK, slots_GxTxK, kept_GxTxK.astype(x_GxTxD.dtype),
                                       num_experts, capacity, x_GxTxD.dtype)
    return jnp.einsum('gtec,gtd->gecd', dispatch_GxTxExC, x_GxTxD)
  flat_GxN = _flat_slots(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity)
  token_GxN = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[None, :, None],
                               experts_GxTxK.shape).reshape(num_groups, -1)
  # Source token of every slot. Kept (expert, slot) pairs are unique, so the scatter never
  # collides; unkept assignments fall off the end, and empty slots keep the sentinel T, which
  # the gather reads as zeros.
  source_GxS = jnp.full((num_groups, num_experts * capacity), tokens, jnp.int32)
  source_GxS = source_GxS.at[jnp.arange(num_groups)[:, None], flat_GxN].set(token_GxN, mode='drop')
  x_GxSxD = jnp.take_along_axis(x_GxTxD, source_GxS[..., None], axis=1, mode='fill', fill_value=0)
  return x_GxSxD.reshape(num_groups, num_experts, capacity, d_model)


def combine(y_GxExCxD: jax.Array, experts_GxTxK: jax.Array, slots_GxTxK: jax.Array,
            kept_GxTxK: jax.Array, weights_GxTxK: jax.Array, backend: str) -> jax.Array:
  """Gate-weighted sum (in f32) of each token's kept expert outputs: -> [G, T, D], y's dtype."""
  _check_backend(backend)
  num_groups, num_experts, capacity, d_model = y_GxExCxD.shape
  weights_GxTxK = weights_GxTxK.astype(jnp.float32)
  if backend == 'einsum':
    combine_GxTxExC = _onehot_routing(experts_GxTxK, slots_GxTxK,
                                      jnp.where(kept_GxTxK, weights_GxTxK, 0.0), num_experts,
                                      capacity, jnp.float32)
    y_GxTxD = jnp.einsum('gtec,gecd->gtd', combine_GxTxExC, y_GxExCxD)
    return y_GxTxD.astype(y_GxExCxD.dtype)
  flat_GxN = _flat_slots(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity)
  y_GxSxD = y_GxExCxD.reshape(num_groups, num_experts * capacity, d_model)
  # Dropped assignments index past the end and read zeros: no output and no gradient.
  y_GxNxD = jnp.take_along_axis(y_GxSxD, flat_GxN[..., None], axis=1, mode='fill', fill_value=0)
  y_GxTxKxD = y_GxNxD.reshape(*experts_GxTxK.shape, d_model)
  return jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, weights_GxTxK).astype(y_GxExCxD.dtype)


def moe_ffn(x_GxTxD: jax.Array, router_w_DxE: jax.Array, w_gate_ExDxF: jax.Array,
            w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, top_k: int, norm_topk_prob: bool,
            capacity: int, backend: str,
            mask_GxT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Top-k routed SwiGLU experts: -> (y [G, T, D] in x's dtype, losses [] and metrics [E], [])."""
  _check_backend(backend)
  num_experts = router_w_DxE.shape[-1]
  if mask_GxT is None:
    mask_GxT = jnp.ones(x_GxTxD.shape[:2], jnp.float32)
  logits_GxTxE = jnp.einsum('gtd,de->gte', x_GxTxD.astype(jnp.float32),
                            router_w_DxE.astype(jnp.float32))
  probs_GxTxE = routing.router_probabilities(logits_GxTxE)
  weights_GxTxK, experts_GxTxK = routing.top_k_gates(probs_GxTxE, top_k, norm_topk_prob)
  slots_GxTxK, kept_GxTxK = assign_slots(experts_GxTxK, mask_GxT, num_experts, capacity)

  dtype = x_GxTxD.dtype
  x_GxExCxD = dispatch(x_GxTxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity,
                       backend)
  gate_GxExCxF = jnp.einsum('gecd,edf->gecf', x_GxExCxD, w_gate_ExDxF.astype(dtype))
  up_GxExCxF = jnp.einsum('gecd,edf->gecf', x_GxExCxD, w_up_ExDxF.astype(dtype))
  y_GxExCxD = jnp.einsum('gecf,efd->gecd', jax.nn.silu(gate_GxExCxF) * up_GxExCxF,
                         w_down_ExFxD.astype(dtype))
  y_GxTxD = combine(y_GxExCxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, weights_GxTxK, backend)

  aux = {
      'aux_loss': routing.load_balance_loss(probs_GxTxE, experts_GxTxK, mask_GxT),
      'z_loss': routing.router_z_loss(logits_GxTxE, mask_GxT),
      'expert_fraction': routing.expert_fraction(experts_GxTxK, mask_GxT, num_experts),
      'dropped_fraction': dropped_fraction(kept_GxTxK, mask_GxT),
  }
  return y_GxTxD, aux
