"""Dropless expert parallelism: every expert owner receives exactly the rows it computes.

Inside `jax.shard_map`, each device sorts its own (token, expert) assignments by expert,
`ragged_all_to_all` over 'expert' sends every owner just the rows of its experts, the local
experts run as grouped matmuls (`dropless.ragged_dot`) on what arrives, and a second ragged
exchange brings the results home to be unsorted and combined. Nothing is dropped, whatever the
routing.

XLA:CPU does not implement `ragged_all_to_all`, so there the exchange is emulated with a dense
`all_to_all` of every slice padded to its worst-case size: the same values and gradients, for
tests and small CPU runs, at the cost of memory and bandwidth.

Shape suffixes as in `dispatch`, plus L = E / |expert| local experts, P = |expert| peers,
M = G·T·K local assignments, R = P·M receive rows and N slices of a ragged exchange.
"""

import jax
import jax.numpy as jnp

from moetrain.models import dropless

NATIVE_BACKENDS = ('gpu', 'tpu')


def _varying_axes(x) -> frozenset:
  """Manual mesh axes over which x's type says it varies (empty when check_vma=False)."""
  aval = jax.typeof(x)
  axes = getattr(aval, 'vma', None)  # JAX before 0.10
  if axes is None:
    axes = getattr(getattr(aval, 'mat', None), 'varying', frozenset())
  return frozenset(axes)


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets_N: jax.Array,
                               send_sizes_N: jax.Array, output_offsets_N: jax.Array,
                               recv_sizes_N: jax.Array, axis_name) -> jax.Array:
  """`jax.lax.ragged_all_to_all` from one dense `all_to_all`: -> output's shape and dtype.

  Slice i (rows input_offsets[i] : +send_sizes[i] of operand) goes to peer i // (N / P), which
  writes recv_sizes[j] rows of the slice it files at j at the offset that the sender gave as
  output_offsets. Every slice travels padded to min(operand rows, output rows).
  """
  num_slices = input_offsets_N.shape[0]
  chunk = min(operand.shape[0], output.shape[0])
  rows_C = jnp.arange(chunk, dtype=input_offsets_N.dtype)
  # Rows past a slice's size read the out-of-range row, hence zeros, and pass no gradient back.
  source_NxC = jnp.where(rows_C < send_sizes_N[:, None], input_offsets_N[:, None] + rows_C,
                         operand.shape[0])
  chunks_NxCx_ = jnp.take(operand, source_NxC, axis=0, mode='fill', fill_value=0)
  # Split N into P runs of N/P slices, run p to peer p; what arrives is ordered by sender,
  # exactly the slot order of recv_sizes. The offsets travel the same way, which turns them
  # into offsets in this device's output.
  received_NxCx_ = jax.lax.all_to_all(chunks_NxCx_, axis_name, 0, 0, tiled=True)
  offsets_N = jax.lax.all_to_all(output_offsets_N, axis_name, 0, 0, tiled=True)
  target_NxC = jnp.where(rows_C < recv_sizes_N[:, None], offsets_N[:, None] + rows_C,
                         output.shape[0])
  # Padding rows scatter out of range and are dropped; rows nobody writes keep `output`.
  return output.at[target_NxC.reshape(num_slices * chunk)].set(
      received_NxCx_.reshape(num_slices * chunk, *operand.shape[1:]).astype(output.dtype),
      mode='drop')


def ragged_exchange(operand: jax.Array, output: jax.Array, input_offsets_N: jax.Array,
                    send_sizes_N: jax.Array, output_offsets_N: jax.Array, recv_sizes_N: jax.Array,
                    axis_name, *, native: bool | None = None) -> jax.Array:
  """`jax.lax.ragged_all_to_all` semantics on every backend: -> output's shape and dtype.

  `native` None uses the primitive on GPU and TPU and the emulation elsewhere.
  """
  if native is None:
    native = jax.default_backend() in NATIVE_BACKENDS
  if not native:
    return emulated_ragged_all_to_all(operand, output, input_offsets_N, send_sizes_N,
                                      output_offsets_N, recv_sizes_N, axis_name)
  # The primitive types its result like `output`; received rows vary with the senders, so a
  # fresh (invariant) buffer would be mistyped and its gradient wrongly summed over peers.
  exchanged = set(axis_name) if isinstance(axis_name, (tuple, list)) else {axis_name}
  axes = (_varying_axes(operand) | exchanged) - _varying_axes(output)
  if axes:
    output = jax.lax.pcast(output, tuple(sorted(axes)), to='varying')
  return jax.lax.ragged_all_to_all(operand, output, input_offsets_N, send_sizes_N,
                                   output_offsets_N, recv_sizes_N, axis_name=axis_name)


def gather_fsdp(w, axis: int):
  """The whole `axis` of an FSDP-sharded weight block (its gradient is reduce-scattered)."""
  if jax.lax.axis_size('fsdp') == 1:
    return w
  return jax.lax.all_gather(w, 'fsdp', axis=axis, tiled=True)


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def dropless_exchanged_ffn(x_GxTxD: jax.Array, experts_GxTxK: jax.Array,
                           weights_GxTxK: jax.Array, mask_GxT: jax.Array,
                           w_gate_LxDxF: jax.Array, w_up_LxDxF: jax.Array,
                           w_down_LxFxD: jax.Array, *, num_experts: int,
                           native: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Inside shard_map: dropless top-k experts -> (y [G, T, D] in x's dtype, kept [G, T, K]).

  Token arrays are this device's dispatch groups; the weights its blocks: L = E / |expert|
  experts, D split over 'fsdp' and F over 'tensor'. Equals `dispatch.token_choice_ffn(...,
  backend='dropless')` on the whole batch. `native` as in `ragged_exchange`.
  """
  num_groups, tokens, d_model = x_GxTxD.shape
  k = experts_GxTxK.shape[-1]
  num_assignments = num_groups * tokens * k
  num_local = w_gate_LxDxF.shape[0]
  peers = jax.lax.axis_size('expert')
  if num_local * peers != num_experts:
    raise ValueError(f'{num_local} local experts on each of {peers} expert ranks are not '
                     f'num_experts={num_experts}')
  me = jax.lax.axis_index('expert')
  dtype = x_GxTxD.dtype

  # As in `dropless.dropless_ffn`: padding and null assignments sort behind every expert
  # (key E) and are never sent; the sentinel token row reads zeros and takes no gradient.
  kept_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  kept_M = kept_GxTxK.reshape(-1)
  expert_M = jnp.where(kept_M, experts_GxTxK.reshape(-1), num_experts)
  order_M = jnp.argsort(expert_M, stable=True)
  token_M = jnp.where(kept_M, jnp.arange(num_assignments) // k, num_groups * tokens)
  x_MxD = jnp.take(x_GxTxD.reshape(-1, d_model), token_M[order_M], axis=0, mode='fill',
                   fill_value=0)

  # Rows this device sends each expert, and everybody else's: the offsets of both exchanges
  # follow from these counts alone, so one small all_gather replaces two offset exchanges.
  counts_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  counts_PxE = jax.lax.all_gather(counts_E, 'expert')
  # An owner files what it receives by local expert, then by sender, so that each local
  # expert's rows are one contiguous group for the grouped matmul.
  totals_PxL = jnp.sum(counts_PxE, axis=0).reshape(peers, num_local)
  expert_start_E = _exclusive_cumsum(totals_PxL, axis=1).reshape(num_experts)
  senders_before_PxE = _exclusive_cumsum(counts_PxE, axis=0)
  send_offsets_PxE = _exclusive_cumsum(counts_PxE, axis=1)  # in each sender's sorted rows
  mine = lambda a_PxE: jax.lax.dynamic_slice_in_dim(a_PxE, me * num_local, num_local, axis=1)

  # Slice e carries my rows for expert e to its owner e // L (L slices per peer). The receive
  # buffer fits the worst case, every peer sending all its M rows here, so nothing is dropped.
  received_RxD = ragged_exchange(
      x_MxD, jnp.zeros((peers * num_assignments, d_model), dtype), _exclusive_cumsum(counts_E, 0),
      counts_E, expert_start_E + senders_before_PxE[me], mine(counts_PxE).reshape(-1),
      'expert', native=native)

  group_sizes_L = totals_PxL[me]
  w_gate = gather_fsdp(w_gate_LxDxF, axis=1).astype(dtype)
  w_up = gather_fsdp(w_up_LxDxF, axis=1).astype(dtype)
  w_down = gather_fsdp(w_down_LxFxD, axis=2).astype(dtype)
  gate_RxF = dropless.ragged_dot(received_RxD, w_gate, group_sizes_L)
  up_RxF = dropless.ragged_dot(received_RxD, w_up, group_sizes_L)
  partial_RxD = dropless.ragged_dot(jax.nn.silu(gate_RxF) * up_RxF, w_down, group_sizes_L)
  # Each 'tensor' rank holds a slice of the hidden units: their contributions add up.
  y_RxD = jax.lax.psum(partial_RxD, 'tensor')
  # Whatever a kernel leaves in the rows of no group must neither reach y nor get a gradient.
  valid_R = jnp.arange(peers * num_assignments) < jnp.sum(group_sizes_L)
  y_RxD = jnp.where(valid_R[:, None], y_RxD, 0)

  # The way back: slice s·L + l returns sender s's rows for my local expert l to where they
  # started in its sorted rows. Rows of padding and null assignments stay zero.
  start_PxL = mine(expert_start_E[None, :]) + mine(senders_before_PxE)
  y_MxD = ragged_exchange(
      y_RxD, jnp.zeros((num_assignments, d_model), y_RxD.dtype), start_PxL.reshape(-1),
      mine(counts_PxE).reshape(-1), mine(send_offsets_PxE).reshape(-1), counts_E, 'expert',
      native=native)

  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(num_assignments,
                                                                  dtype=order_M.dtype))
  y_GxTxKxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(num_groups, tokens, k, d_model)
  y_GxTxD = jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, weights_GxTxK.astype(jnp.float32))
  return y_GxTxD.astype(dtype), kept_GxTxK
