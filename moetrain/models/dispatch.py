"""Token dispatch and combine for sparse MoE layers, and the SwiGLU expert computation.

Shape suffixes: G dispatch groups, T tokens per group, D model dim, F expert hidden dim,
E experts, C capacity (slots per expert per group), K experts per token.

Token choice (top-k) routing has three interchangeable backends: 'einsum' (GShard one-hot
[G, T, E, C] tensors, the readable reference), 'capacity' (index gather/scatter without any
[T, E, C] tensor, the fast path) and 'dropless' (no capacity: sort by expert and grouped
matmuls, in `dropless`). An expert index >= E is a null expert (AdaMoE): never kept, takes no
capacity and adds exactly zero. Expert choice routing hands over a slot table [G, E, C] of token
indices, in which the sentinel T marks an empty slot; it runs on 'einsum' or 'capacity'.
"""

import jax
import jax.numpy as jnp

from moetrain.models import dropless, routing

BACKENDS = ('einsum', 'capacity', 'dropless')
CAPACITY_BACKENDS = ('einsum', 'capacity')


def _check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
  if backend not in allowed:
    raise ValueError(f'MoE dispatch backend {backend!r} is not one of {allowed} here')


def _position_slots(experts_GxTxK, real_GxTxK, num_experts):
  """Slot of each real assignment in token order, first choices first: -> [G, T, K] i32."""
  num_groups, tokens, k = experts_GxTxK.shape
  # one_hot of a null expert (index >= E) is all zeros, so it takes no slot.
  onehot_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.int32)
  onehot_GxTxKxE = onehot_GxTxKxE * real_GxTxK[..., None].astype(jnp.int32)
  # Choice-major order, so every token's first choice is served before any second choice.
  order_GxNxE = onehot_GxTxKxE.transpose(0, 2, 1, 3).reshape(num_groups, k * tokens, num_experts)
  earlier_GxNxE = jnp.cumsum(order_GxNxE, axis=1) - order_GxNxE
  slots_GxN = jnp.sum(earlier_GxNxE * order_GxNxE, axis=-1)
  return slots_GxN.reshape(num_groups, k, tokens).transpose(0, 2, 1).astype(jnp.int32)


def assign_slots(experts_GxTxK: jax.Array, mask_GxT: jax.Array, num_experts: int,
                 capacity: int, *,
                 priority_GxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Buffer position of each assignment: -> (slots i32, kept bool) [G, T, K].

  All first choices are served before any second choice; within a choice, tokens go in
  position order, or with `priority_GxT` highest priority first (BPR; ties: lower position).
  """
  real_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  if priority_GxT is None:
    slots_GxTxK = _position_slots(experts_GxTxK, real_GxTxK, num_experts)
  else:
    order_GxT = jnp.argsort(-priority_GxT, axis=1, stable=True)
    take = lambda a_GxTxK: jnp.take_along_axis(a_GxTxK, order_GxT[..., None], axis=1)
    sorted_slots_GxTxK = _position_slots(take(experts_GxTxK), take(real_GxTxK), num_experts)
    groups_Gx1 = jnp.arange(experts_GxTxK.shape[0])[:, None]
    slots_GxTxK = jnp.zeros_like(sorted_slots_GxTxK).at[groups_Gx1, order_GxT].set(
        sorted_slots_GxTxK)
  return slots_GxTxK, real_GxTxK & (slots_GxTxK < capacity)


def dropped_fraction(kept_GxTxK: jax.Array, mask_GxT: jax.Array, *, experts_GxTxK: jax.Array,
                     num_experts: int) -> jax.Array:
  """Dropped / all assignments of real tokens to real (not null) experts: -> [] f32."""
  real_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
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
  _check_backend(backend, CAPACITY_BACKENDS)
  num_groups, tokens, d_model = x_GxTxD.shape
  if backend == 'einsum':
    dispatch_GxTxExC = _onehot_routing(experts_GxTxK, slots_GxTxK, kept_GxTxK.astype(x_GxTxD.dtype),
                                       num_experts, capacity, x_GxTxD.dtype)
    return jnp.einsum('gtec,gtd->gecd', dispatch_GxTxExC, x_GxTxD)
  flat_GxN = _flat_slots(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity)
  token_GxN = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[None, :, None],
                               experts_GxTxK.shape).reshape(num_groups, -1)
  # Source token of every slot. Kept (expert, slot) pairs are unique, so the scatter never
  # collides; unkept assignments fall off the end, and empty slots keep the sentinel T.
  source_GxS = jnp.full((num_groups, num_experts * capacity), tokens, jnp.int32)
  source_GxS = source_GxS.at[jnp.arange(num_groups)[:, None], flat_GxN].set(token_GxN, mode='drop')
  return dispatch_slots(x_GxTxD, source_GxS.reshape(num_groups, num_experts, capacity))


def combine(y_GxExCxD: jax.Array, experts_GxTxK: jax.Array, slots_GxTxK: jax.Array,
            kept_GxTxK: jax.Array, weights_GxTxK: jax.Array, backend: str) -> jax.Array:
  """Gate-weighted sum (in f32) of each token's kept expert outputs: -> [G, T, D], y's dtype."""
  _check_backend(backend, CAPACITY_BACKENDS)
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
  # Dropped and null assignments index past the end and read zeros: no output, no gradient.
  y_GxNxD = jnp.take_along_axis(y_GxSxD, flat_GxN[..., None], axis=1, mode='fill', fill_value=0)
  y_GxTxKxD = y_GxNxD.reshape(*experts_GxTxK.shape, d_model)
  return jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, weights_GxTxK).astype(y_GxExCxD.dtype)


def dispatch_slots(x_GxTxD: jax.Array, tokens_GxExC: jax.Array,
                   backend: str = 'capacity') -> jax.Array:
  """The token of every expert slot, sentinel T reading zeros: -> [G, E, C, D]."""
  _check_backend(backend, CAPACITY_BACKENDS)
  num_groups, tokens, d_model = x_GxTxD.shape
  if backend == 'einsum':
    # one_hot of the sentinel T is all zeros.
    onehot_GxExCxT = jax.nn.one_hot(tokens_GxExC, tokens, dtype=x_GxTxD.dtype)
    return jnp.einsum('gect,gtd->gecd', onehot_GxExCxT, x_GxTxD)
  source_GxS = tokens_GxExC.reshape(num_groups, -1)
  x_GxSxD = jnp.take_along_axis(x_GxTxD, source_GxS[..., None], axis=1, mode='fill', fill_value=0)
  return x_GxSxD.reshape(*tokens_GxExC.shape, d_model)


def combine_slots(y_GxExCxD: jax.Array, tokens_GxExC: jax.Array, weights_GxExC: jax.Array,
                  num_tokens: int, backend: str = 'capacity') -> jax.Array:
  """Weighted sum (in f32) of every token's slot outputs: -> [G, T, D], y's dtype."""
  _check_backend(backend, CAPACITY_BACKENDS)
  num_groups, _, _, d_model = y_GxExCxD.shape
  weighted_GxExCxD = y_GxExCxD.astype(jnp.float32) * weights_GxExC.astype(jnp.float32)[..., None]
  if backend == 'einsum':
    onehot_GxExCxT = jax.nn.one_hot(tokens_GxExC, num_tokens, dtype=jnp.float32)
    y_GxTxD = jnp.einsum('gect,gecd->gtd', onehot_GxExCxT, weighted_GxExCxD)
  else:
    # Sentinel slots scatter out of range and are dropped; their gradient is zero too.
    y_GxTxD = jnp.zeros((num_groups, num_tokens, d_model), jnp.float32).at[
        jnp.arange(num_groups)[:, None], tokens_GxExC.reshape(num_groups, -1)].add(
            weighted_GxExCxD.reshape(num_groups, -1, d_model), mode='drop')
  return y_GxTxD.astype(y_GxExCxD.dtype)


def expert_swiglu(x_GxExCxD: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                  w_down_ExFxD: jax.Array) -> jax.Array:
  """Every expert's SwiGLU MLP on its buffer, in x's dtype: -> [G, E, C, D]."""
  dtype = x_GxExCxD.dtype
  gate_GxExCxF = jnp.einsum('gecd,edf->gecf', x_GxExCxD, w_gate_ExDxF.astype(dtype))
  up_GxExCxF = jnp.einsum('gecd,edf->gecf', x_GxExCxD, w_up_ExDxF.astype(dtype))
  return jnp.einsum('gecf,efd->gecd', jax.nn.silu(gate_GxExCxF) * up_GxExCxF,
                    w_down_ExFxD.astype(dtype))


def token_choice_ffn(x_GxTxD: jax.Array, experts_GxTxK: jax.Array, weights_GxTxK: jax.Array,
                     mask_GxT: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                     w_down_ExFxD: jax.Array, *, capacity: int, backend: str,
                     priority_GxT: jax.Array | None = None, expert_fn=expert_swiglu,
                     num_experts: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k routed SwiGLU experts: -> (y [G, T, D] in x's dtype, kept [G, T, K] bool).

  'dropless' ignores `capacity` and `priority_GxT`: it keeps every real-expert assignment.
  `expert_fn` maps the [G, E, C, D] buffers to the experts' outputs (expert parallelism swaps
  in one that exchanges them between devices, and passes `num_experts`, as it hands over only
  its own experts' weights); 'dropless' has no such buffers.
  """
  _check_backend(backend)
  if backend == 'dropless':
    return dropless.dropless_ffn(x_GxTxD, experts_GxTxK, weights_GxTxK, mask_GxT, w_gate_ExDxF,
                                 w_up_ExDxF, w_down_ExFxD)
  num_experts = num_experts or w_gate_ExDxF.shape[0]
  slots_GxTxK, kept_GxTxK = assign_slots(experts_GxTxK, mask_GxT, num_experts, capacity,
                                         priority_GxT=priority_GxT)
  x_GxExCxD = dispatch(x_GxTxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity,
                       backend)
  y_GxExCxD = expert_fn(x_GxExCxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  y_GxTxD = combine(y_GxExCxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, weights_GxTxK, backend)
  return y_GxTxD, kept_GxTxK


def expert_choice_ffn(x_GxTxD: jax.Array, tokens_GxExC: jax.Array, weights_GxExC: jax.Array,
                      w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *,
                      backend: str, expert_fn=expert_swiglu) -> jax.Array:
  """SwiGLU experts on the tokens each expert picked (slot table): -> [G, T, D] in x's dtype."""
  _check_backend(backend, CAPACITY_BACKENDS)
  x_GxExCxD = dispatch_slots(x_GxTxD, tokens_GxExC, backend)
  y_GxExCxD = expert_fn(x_GxExCxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  return combine_slots(y_GxExCxD, tokens_GxExC, weights_GxExC, x_GxTxD.shape[1], backend)


def moe_ffn(x_GxTxD: jax.Array, router_w_DxE: jax.Array, w_gate_ExDxF: jax.Array,
            w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, top_k: int, norm_topk_prob: bool,
            capacity: int, backend: str,
            mask_GxT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax top-k routed SwiGLU experts: -> (y [G, T, D] in x's dtype, losses and metrics)."""
  _check_backend(backend)
  num_experts = router_w_DxE.shape[-1]
  if mask_GxT is None:
    mask_GxT = jnp.ones(x_GxTxD.shape[:2], jnp.float32)
  logits_GxTxE = jnp.einsum('gtd,de->gte', x_GxTxD.astype(jnp.float32),
                            router_w_DxE.astype(jnp.float32))
  probs_GxTxE = routing.router_probabilities(logits_GxTxE)
  weights_GxTxK, experts_GxTxK = routing.top_k_gates(probs_GxTxE, top_k, norm_topk_prob)
  y_GxTxD, kept_GxTxK = token_choice_ffn(x_GxTxD, experts_GxTxK, weights_GxTxK, mask_GxT,
                                         w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                         capacity=capacity, backend=backend)
  aux = {
      'aux_loss': routing.load_balance_loss(probs_GxTxE, experts_GxTxK, mask_GxT),
      'z_loss': routing.router_z_loss(logits_GxTxE, mask_GxT),
      'expert_fraction': routing.expert_fraction(experts_GxTxK, mask_GxT, num_experts),
      'dropped_fraction': dropped_fraction(kept_GxTxK, mask_GxT, experts_GxTxK=experts_GxTxK,
                                           num_experts=num_experts),
  }
  return y_GxTxD, aux
