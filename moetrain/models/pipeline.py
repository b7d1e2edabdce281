"""The MoE layer after routing, as one pipeline: plan → exchange → experts → exchange back →
combine.

- plan: where every kept assignment goes. With a capacity, slots in [E, C] buffers per dispatch
  group (`dispatch.assign_slots`); dropless, every real assignment sorted by expert, with each
  expert's row count.
- exchange: `parallel.exchange` moves buffers or rows to their experts' owners and back
  (nothing moves on one device; the same stages run either way).
- experts: `mlp.swiglu`, batched over capacity buffers or by a grouped matmul over sorted rows,
  its matmuls in FP8 under a `model.fp8` recipe (`fp8`), the weights then gathered over FSDP in
  FP8 where the exchange can (`exchange.quantized_expert_weights`).
- combine: every token's gate-weighted sum of its experts' outputs, in float32.

Dropless keeps every real assignment and computes exactly those rows: no [G, E, T, D] buffer.
Shape suffixes as in `dispatch`, plus M = G·T·K assignments and R rows at the experts.
"""

import functools

import jax
import jax.numpy as jnp

from moetrain.models import dispatch, fp8 as fp8_lib, grouped_matmul
from moetrain.models.mlp import swiglu
from moetrain.parallel import exchange as exchange_lib


def token_choice(x_GxTxD: jax.Array, experts_GxTxK: jax.Array, gates_GxTxK: jax.Array,
                 mask_GxT: jax.Array, expert_weights: tuple, *, num_experts: int,
                 capacity: int | None, backend: str = 'capacity',
                 priority_GxT: jax.Array | None = None,
                 exchange=exchange_lib.LOCAL, chunks: int = 1,
                 fp8: str = 'none') -> tuple[jax.Array, jax.Array]:
  """Top-k routed SwiGLU experts: -> (y [G, T, D] in x's dtype, kept [G, T, K] bool).

  `expert_weights` = (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]). `capacity` None is
  dropless (`backend` and `priority_GxT` do not apply); otherwise `backend` ('capacity' or
  'einsum', see `dispatch`) builds the [G, E, C, D] buffers. Expert indices >= num_experts
  are null experts: never kept, zero output. Each device's groups travel to the experts in
  `chunks` independent chunks (which must divide them), so that one chunk's exchange may
  overlap another's expert matmuls; the result does not depend on it. `fp8`: the experts'
  matmul recipe (`models.fp8`); its weights are the masters, otherwise the activation dtype's.
  """
  if capacity is not None and hasattr(exchange, 'token_choice'):
    # A node-aware exchange plans each token's nodes before its experts (`models.two_level`).
    return exchange.token_choice(x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, expert_weights,
                                 num_experts=num_experts, capacity=capacity, backend=backend,
                                 priority_GxT=priority_GxT, chunks=chunks, fp8=fp8)
  if capacity is None:
    per_device = functools.partial(_dropless, num_experts=num_experts, exchange=exchange,
                                   chunks=chunks, fp8=fp8)
    arrays = (x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT)
  else:
    per_device = functools.partial(_with_capacity, num_experts=num_experts, capacity=capacity,
                                   backend=backend, exchange=exchange, chunks=chunks, fp8=fp8)
    arrays = (x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, priority_GxT)
  return exchange.run(per_device, arrays, expert_weights)


def expert_choice(x_GxTxD: jax.Array, tokens_GxExC: jax.Array, gates_GxExC: jax.Array,
                  expert_weights: tuple, *, backend: str = 'capacity',
                  exchange=exchange_lib.LOCAL, chunks: int = 1, fp8: str = 'none') -> jax.Array:
  """SwiGLU experts on the tokens each expert picked (slot table, sentinel T for an empty
  slot; `routing.expert_choice`): -> y [G, T, D] in x's dtype. `chunks` and `fp8` as in
  token_choice."""
  def per_device(arrays, weights):
    x_GxTxD, tokens_GxExC, gates_GxExC = arrays
    x_GxExCxD = dispatch.dispatch_slots(x_GxTxD, tokens_GxExC, backend)
    y_GxExCxD = _buffer_experts(x_GxExCxD, weights, exchange, chunks, fp8)
    return dispatch.combine_slots(y_GxExCxD, tokens_GxExC, gates_GxExC, x_GxTxD.shape[1],
                                  backend)
  return exchange.run(per_device, (x_GxTxD, tokens_GxExC, gates_GxExC), expert_weights)


def _with_capacity(arrays, weights, *, num_experts, capacity, backend, exchange, chunks, fp8):
  x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, priority_GxT = arrays
  slots_GxTxK, kept_GxTxK = dispatch.assign_slots(experts_GxTxK, mask_GxT, num_experts,
                                                  capacity, priority_GxT=priority_GxT)
  x_GxExCxD = dispatch.dispatch(x_GxTxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, num_experts,
                                capacity, backend)
  y_GxExCxD = _buffer_experts(x_GxExCxD, weights, exchange, chunks, fp8)
  y_GxTxD = dispatch.combine(y_GxExCxD, experts_GxTxK, slots_GxTxK, kept_GxTxK, gates_GxTxK,
                             backend)
  return y_GxTxD, kept_GxTxK


def _local_weights(weights, exchange, dtype, fp8):
  """This device's expert blocks, gathered once for all chunks: in the activation dtype, or
  under an FP8 recipe the masters, as `fp8_lib.Fp8Weight`s where the exchange gathered their
  float8 copies (the masters' gathers then only carry the gradients back)."""
  local = exchange.expert_weights(*weights)
  if fp8 == fp8_lib.NONE:
    return tuple(w.astype(dtype) for w in local)
  ahead = exchange.quantized_expert_weights(fp8, *weights)
  return tuple(w if q is None else fp8_lib.Fp8Weight(w, *q) for w, q in zip(local, ahead))


def _buffer_experts(x_GxExCxD, weights, exchange, chunks, fp8):
  """Every expert's SwiGLU on its capacity buffers, wherever the expert lives: -> [G, E, C, D].
  The groups go in `chunks` exchanges, none waiting on another's experts."""
  local = _local_weights(weights, exchange, x_GxExCxD.dtype, fp8)
  return jnp.concatenate([
      exchange.buffers_from_experts(_buffer_swiglu(exchange.buffers_to_experts(x), local,
                                                   exchange, fp8))
      for x in jnp.split(x_GxExCxD, chunk_count(x_GxExCxD.shape[0], chunks))])


def chunk_count(groups: int, chunks: int) -> int:
  """`chunks`, or 1 where they do not divide a device's `groups`. The config checks hold the
  training batch to it; a batch of another size (one row decoded, an odd evaluation batch)
  runs in one chunk, which gives the same result."""
  return chunks if groups % chunks == 0 else 1


def _buffer_swiglu(x_NxLxCxD, local_weights, exchange, fp8):
  groups, num_local, capacity, d_model = x_NxLxCxD.shape
  # Batched matmuls want the batch (expert) dim first: one layout change in and one out, rather
  # than XLA transposing every matmul's operands and results (forward and backward; -28% of
  # the layer's train step on CPU). B = N·C: an expert's buffer rows of all groups.
  x_LxBxD = x_NxLxCxD.transpose(1, 0, 2, 3).reshape(num_local, groups * capacity, d_model)
  y_LxBxD = exchange.sum_hidden(swiglu(x_LxBxD, *local_weights, matmul=fp8_lib.matmul(fp8)))
  return y_LxBxD.reshape(num_local, groups, capacity, d_model).transpose(1, 0, 2, 3)


def sort_by_expert(experts_GxTxK: jax.Array, kept_GxTxK: jax.Array,
                   num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The dropless plan: -> (order [M]: assignments sorted by expert, stable; their source
  token [M] in sorted order, G·T for an assignment not kept; rows per expert [E] i32).

  Assignments not kept (padding, null experts) get the key E and sort behind every expert.
  """
  num_groups, tokens, k = experts_GxTxK.shape
  kept_M = kept_GxTxK.reshape(-1)
  expert_M = jnp.where(kept_M, experts_GxTxK.reshape(-1), num_experts)
  order_M = jnp.argsort(expert_M, stable=True)
  token_M = jnp.where(kept_M, jnp.arange(num_groups * tokens * k) // k, num_groups * tokens)
  counts_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  return order_M, token_M[order_M], counts_E


def _dropless(arrays, weights, *, num_experts, exchange, chunks, fp8):
  """Dropless experts on this device's groups, in `chunks` independent exchanges."""
  local = _local_weights(weights, exchange, arrays[0].dtype, fp8)
  chunks = chunk_count(arrays[0].shape[0], chunks)
  parts = [_dropless_chunk(chunk, local, num_experts, exchange, fp8)
           for chunk in zip(*(jnp.split(a, chunks) for a in arrays))]
  return tuple(jnp.concatenate(outputs) for outputs in zip(*parts))


def _dropless_chunk(arrays, local_weights, num_experts, exchange, fp8):
  x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT = arrays
  num_groups, tokens, d_model = x_GxTxD.shape
  k = experts_GxTxK.shape[-1]
  kept_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  order_M, token_M, counts_E = sort_by_expert(experts_GxTxK, kept_GxTxK, num_experts)
  # The sentinel token row reads zeros, and its gradient falls off the end instead of reaching x.
  x_MxD = jnp.take(x_GxTxD.reshape(-1, d_model), token_M, axis=0, mode='fill', fill_value=0)
  y_MxD = _row_experts(x_MxD, counts_E, local_weights, exchange, fp8)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(
      jnp.arange(order_M.shape[0], dtype=order_M.dtype), unique_indices=True)
  y_GxTxKxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(num_groups, tokens, k, d_model)
  y_GxTxD = jnp.einsum('gtkd,gtk->gtd', y_GxTxKxD, gates_GxTxK.astype(jnp.float32))
  return y_GxTxD.astype(x_GxTxD.dtype), kept_GxTxK


def _row_experts(x_MxD, counts_E, local_weights, exchange, fp8):
  """Every expert's SwiGLU on its sorted rows, wherever the expert lives: -> [M, D]; rows of no
  expert (sorted last) come out zero."""
  x_RxD, group_sizes_L, way_back = exchange.rows_to_experts(x_MxD, counts_E)
  matmul = fp8_lib.matmul(fp8, grouped_matmul.ragged_dot, group_sizes_L)
  y_RxD = exchange.sum_hidden(swiglu(x_RxD, *local_weights, matmul=matmul))
  return exchange.rows_from_experts(y_RxD, way_back)
