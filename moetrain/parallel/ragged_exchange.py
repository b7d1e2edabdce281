"""`ragged_all_to_all` semantics on every backend: the dropless expert exchange's transport.

Each slice of rows goes to one peer, which files it at an offset the sender names; the dropless
MoE exchange (`exchange.ExpertParallel`) sends every expert owner exactly the rows of its
experts this way, nothing dropped, whatever the routing.

XLA:CPU does not implement `ragged_all_to_all`, so there the exchange is emulated with a dense
`all_to_all` of every slice padded to its worst-case size: the same values and gradients, for
tests and small CPU runs, at the cost of memory and bandwidth.

Shape suffixes: N slices of a ragged exchange, an equal run of them per peer; C rows a slice
travels padded to in the emulation.
"""

import jax
import jax.numpy as jnp

from moetrain.jax_compat import varying_axes

NATIVE_BACKENDS = ('gpu', 'tpu')


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
  axes = (varying_axes(operand) | exchanged) - varying_axes(output)
  if axes:
    output = jax.lax.pcast(output, tuple(sorted(axes)), to='varying')
  return jax.lax.ragged_all_to_all(operand, output, input_offsets_N, send_sizes_N,
                                   output_offsets_N, recv_sizes_N, axis_name=axis_name)
