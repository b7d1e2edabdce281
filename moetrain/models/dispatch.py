"""The capacity plan of sparse MoE layers: slots in [G, E, C] buffers, dispatch and combine.

Shape suffixes: G dispatch groups, T tokens per group, D model dim, E experts, C capacity
(slots per expert per group), K experts per token; N = T·K assignments and S = E·C buffer rows
of a group.

Two interchangeable backends build the buffers and combine the results: 'einsum' (GShard
one-hot [G, T, E, C] tensors, the readable reference) and 'capacity' (row gathers by index
tables, in the backward pass too, without any [T, E, C] tensor: the fast path). An expert
index >= E is a null expert (AdaMoE): never kept, takes no capacity and adds exactly zero.
Expert choice routing hands over a slot table [G, E, C] of token indices, in which the sentinel
T marks an empty slot. `pipeline` runs these stages; dropless routing has no buffers at all.
"""

import jax
import jax.numpy as jnp

BACKENDS = ('einsum', 'capacity')


def _check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f'MoE dispatch backend {backend!r} is not one of {BACKENDS}')


# From this many experts on, a stable sort finds the slots faster than a one-hot [G, T·K, E]
# cumsum (XLA:CPU, G=8 T=512: the one-hot is faster at E=8..16, the sort at E=32, and 2.5× / 24×
# faster at E=64 k=8 / E=256 k=8). Both give the same slots.
SORT_SLOTS_MIN_EXPERTS = 32


def _choice_major(a_GxTxK):
  """[G, T, K] -> [G, K·T]: every token's first choice, then every second choice, ..."""
  num_groups, tokens, k = a_GxTxK.shape
  return a_GxTxK.transpose(0, 2, 1).reshape(num_groups, k * tokens)


def _token_major(a_GxN, tokens):
  """Inverse of `_choice_major`: [G, K·T] -> [G, T, K]."""
  return a_GxN.reshape(a_GxN.shape[0], -1, tokens).transpose(0, 2, 1)


def _onehot_position_slots(experts_GxTxK, real_GxTxK, num_experts):
  """`_position_slots` by a running count per expert over a one-hot [G, T·K, E] tensor."""
  num_groups, tokens, k = experts_GxTxK.shape
  # one_hot of a null expert (index >= E) is all zeros, so it takes no slot.
  onehot_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.int32)
  onehot_GxTxKxE = onehot_GxTxKxE * real_GxTxK[..., None].astype(jnp.int32)
  # Choice-major order, so every token's first choice is served before any second choice.
  order_GxNxE = onehot_GxTxKxE.transpose(0, 2, 1, 3).reshape(num_groups, k * tokens, num_experts)
  earlier_GxNxE = jnp.cumsum(order_GxNxE, axis=1) - order_GxNxE
  slots_GxN = jnp.sum(earlier_GxNxE * order_GxNxE, axis=-1)
  return _token_major(slots_GxN, tokens).astype(jnp.int32)


def _sorted_position_slots(experts_GxTxK, real_GxTxK, num_experts):
  """`_position_slots` by a stable sort of the choice-major assignments by expert."""
  num_groups, tokens, k = experts_GxTxK.shape
  # Padding and null assignments get the key E and sort behind every expert's run.
  key_GxN = _choice_major(jnp.where(real_GxTxK, experts_GxTxK, num_experts))
  order_GxN = jnp.argsort(key_GxN, axis=1, stable=True)
  sorted_GxN = jnp.take_along_axis(key_GxN, order_GxN, axis=1)
  rank_N = jnp.arange(k * tokens, dtype=jnp.int32)
  run_start_GxN = jnp.concatenate(
      [jnp.ones((num_groups, 1), bool), sorted_GxN[:, 1:] != sorted_GxN[:, :-1]], axis=1)
  # Slot = rank in the sorted order minus the rank where this expert's run starts.
  sorted_slots_GxN = rank_N - jax.lax.cummax(jnp.where(run_start_GxN, rank_N, 0), axis=1)
  slots_GxN = jnp.zeros_like(sorted_slots_GxN).at[
      jnp.arange(num_groups)[:, None], order_GxN].set(sorted_slots_GxN, unique_indices=True)
  return jnp.where(real_GxTxK, _token_major(slots_GxN, tokens), 0)


def _position_slots(experts_GxTxK, real_GxTxK, num_experts):
  """Slot of each real assignment in token order, first choices first (others 0): -> [G, T, K]."""
  if num_experts >= SORT_SLOTS_MIN_EXPERTS:
    return _sorted_position_slots(experts_GxTxK, real_GxTxK, num_experts)
  return _onehot_position_slots(experts_GxTxK, real_GxTxK, num_experts)


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


def _slot_tables(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts, capacity):
  """The two inverse tables between assignments and rows of a flat [G, S = E·C] buffer.

  -> (row of each assignment [G, T, K], S if not kept; assignment t·K + k in each row [G, S],
  T·K if empty). Kept (expert, slot) pairs are unique, so kept assignments and filled rows are
  in one-to-one correspondence, and gathering by one table transposes gathering by the other.
  """
  num_groups, tokens, k = experts_GxTxK.shape
  rows = num_experts * capacity
  row_GxTxK = jnp.where(kept_GxTxK, experts_GxTxK * capacity + slots_GxTxK, rows)
  assignment_GxS = jnp.full((num_groups, rows), tokens * k, jnp.int32)
  # Unkept assignments fall off the end; the kept ones never collide.
  assignment_GxS = assignment_GxS.at[jnp.arange(num_groups)[:, None],
                                     row_GxTxK.reshape(num_groups, -1)].set(
      jnp.arange(tokens * k, dtype=jnp.int32), mode='drop')
  return row_GxTxK.astype(jnp.int32), assignment_GxS


def _take_rows(x_GxTxD, rows_GxN):
  """Row rows_GxN[g, n] of x[g] for every n, an index >= T reading zeros: -> [G, N, D]."""
  return jnp.take_along_axis(x_GxTxD, rows_GxN[..., None], axis=1, mode='fill', fill_value=0)


@jax.custom_vjp
def _gather_dispatch(x_GxTxD, source_GxS, row_GxTxK):
  """x's row of every buffer row's source token, sentinel T reading zeros: -> [G, S, D].

  `row_GxTxK` is the inverse table (see `_slot_tables`): the transpose is a gather too, each
  token's gradient the sum of its K rows' gradients, unkept assignments (row S) reading zeros.
  """
  return _take_rows(x_GxTxD, source_GxS)


def _gather_dispatch_fwd(x_GxTxD, source_GxS, row_GxTxK):
  return _take_rows(x_GxTxD, source_GxS), row_GxTxK


def _gather_dispatch_bwd(row_GxTxK, ct_GxSxD):
  num_groups, tokens, k = row_GxTxK.shape
  ct_GxNxD = _take_rows(ct_GxSxD, row_GxTxK.reshape(num_groups, -1))
  ct_GxTxKxD = ct_GxNxD.reshape(num_groups, tokens, k, -1).astype(jnp.float32)
  return jnp.sum(ct_GxTxKxD, axis=2).astype(ct_GxSxD.dtype), None, None


_gather_dispatch.defvjp(_gather_dispatch_fwd, _gather_dispatch_bwd)


@jax.custom_vjp
def _gather_combine(y_GxSxD, weights_GxTxK, row_GxTxK, assignment_GxS):
  """Weighted f32 sum of each token's K buffer rows, row S reading zeros: -> [G, T, D] f32.

  `weights_GxTxK` is f32. The transpose wrt y gathers each row's token gradient by
  `assignment_GxS`, times the weight of the row's assignment; empty rows read zeros.
  """
  return _gather_combine_fwd(y_GxSxD, weights_GxTxK, row_GxTxK, assignment_GxS)[0]


def _gather_combine_fwd(y_GxSxD, weights_GxTxK, row_GxTxK, assignment_GxS):
  num_groups, tokens, k = row_GxTxK.shape
  y_GxNxD = _take_rows(y_GxSxD, row_GxTxK.reshape(num_groups, -1))
  y_GxTxKxD = y_GxNxD.reshape(num_groups, tokens, k, -1)
  y_GxTxD = jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, weights_GxTxK)
  # The gathered rows (T·K·D, not the S·D buffer) are what the weight gradient needs.
  return y_GxTxD, (y_GxTxKxD, weights_GxTxK, assignment_GxS)


def _gather_combine_bwd(residuals, ct_GxTxD):
  y_GxTxKxD, weights_GxTxK, assignment_GxS = residuals
  num_groups, tokens, k, _ = y_GxTxKxD.shape
  # Empty rows hold the assignment T·K: token T and weight index T·K, both reading zeros.
  weight_GxS = jnp.take_along_axis(weights_GxTxK.reshape(num_groups, -1), assignment_GxS,
                                   axis=1, mode='fill', fill_value=0)
  ct_GxSxD = weight_GxS[..., None] * _take_rows(ct_GxTxD, assignment_GxS // k)
  ct_weights_GxTxK = jnp.einsum('gtkd,gtd->gtk', y_GxTxKxD.astype(jnp.float32), ct_GxTxD)
  return ct_GxSxD.astype(y_GxTxKxD.dtype), ct_weights_GxTxK, None, None


_gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


def _onehot_routing(experts_GxTxK, slots_GxTxK, scale_GxTxK, num_experts, capacity, dtype):
  """GShard routing tensor: sum over k of scale * onehot(expert) x onehot(slot): -> [G, T, E, C]."""
  expert_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=dtype) * scale_GxTxK[..., None]
  slot_GxTxKxC = jax.nn.one_hot(slots_GxTxK, capacity, dtype=dtype)
  return jnp.einsum('gtke,gtkc->gtec', expert_GxTxKxE, slot_GxTxKxC)


def dispatch(x_GxTxD: jax.Array, experts_GxTxK: jax.Array, slots_GxTxK: jax.Array,
             kept_GxTxK: jax.Array, num_experts: int, capacity: int, backend: str) -> jax.Array:
  """Each expert's capacity buffer of its kept tokens, empty slots zero: -> [G, E, C, D]."""
  _check_backend(backend)
  num_groups, _, d_model = x_GxTxD.shape
  if backend == 'einsum':
    dispatch_GxTxExC = _onehot_routing(experts_GxTxK, slots_GxTxK, kept_GxTxK.astype(x_GxTxD.dtype),
                                       num_experts, capacity, x_GxTxD.dtype)
    return jnp.einsum('gtec,gtd->gecd', dispatch_GxTxExC, x_GxTxD)
  row_GxTxK, assignment_GxS = _slot_tables(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts,
                                           capacity)
  # Source token of every buffer row; empty rows keep the sentinel T.
  x_GxSxD = _gather_dispatch(x_GxTxD, assignment_GxS // experts_GxTxK.shape[-1], row_GxTxK)
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
  row_GxTxK, assignment_GxS = _slot_tables(experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts,
                                           capacity)
  y_GxSxD = y_GxExCxD.reshape(num_groups, num_experts * capacity, d_model)
  # Dropped and null assignments read zeros: no output, no gradient.
  y_GxTxD = _gather_combine(y_GxSxD, weights_GxTxK, row_GxTxK, assignment_GxS)
  return y_GxTxD.astype(y_GxExCxD.dtype)


def dispatch_slots(x_GxTxD: jax.Array, tokens_GxExC: jax.Array,
                   backend: str = 'capacity') -> jax.Array:
  """The token of every expert slot, sentinel T reading zeros: -> [G, E, C, D]."""
  _check_backend(backend)
  num_groups, tokens, d_model = x_GxTxD.shape
  if backend == 'einsum':
    # one_hot of the sentinel T is all zeros.
    onehot_GxExCxT = jax.nn.one_hot(tokens_GxExC, tokens, dtype=x_GxTxD.dtype)
    return jnp.einsum('gect,gtd->gecd', onehot_GxExCxT, x_GxTxD)
  x_GxSxD = _take_rows(x_GxTxD, tokens_GxExC.reshape(num_groups, -1))
  return x_GxSxD.reshape(*tokens_GxExC.shape, d_model)


def combine_slots(y_GxExCxD: jax.Array, tokens_GxExC: jax.Array, weights_GxExC: jax.Array,
                  num_tokens: int, backend: str = 'capacity') -> jax.Array:
  """Weighted sum (in f32) of every token's slot outputs: -> [G, T, D], y's dtype."""
  _check_backend(backend)
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
