"""Expert parallelism: every device routes its own tokens and sends them to the experts' owners.

With a mesh whose 'expert' axis is larger than one, the routed experts run inside
`jax.shard_map` over the whole mesh. Each device dispatches its own dispatch groups into
[G, E, C, D] buffers (capacity and dropping stay per group, so they never depend on the mesh),
`all_to_all` over 'expert' hands every expert's slots to the device that owns it, the local
experts run on what arrives (their FSDP shards gathered, their hidden dimension split over
'tensor'), and a second `all_to_all` brings the results home to be combined. Routing and the
load statistics stay outside, on global arrays, so the losses are reduced over the whole mesh.

Dropless routing sends every owner exactly the rows of its experts instead
(`ragged_exchange`: `ragged_all_to_all` on GPU and TPU, an all_to_all emulation elsewhere).
"""

import jax
from jax.sharding import PartitionSpec as P

from moetrain.models import dispatch
from moetrain.parallel.mesh import BATCH_AXES
from moetrain.parallel.ragged_exchange import dropless_exchanged_ffn, gather_fsdp

# Expert weights as the rules table lays them out: [E, D, F] and [E, F, D].
IN_SPEC = P('expert', 'fsdp', 'tensor')
OUT_SPEC = P('expert', 'tensor', 'fsdp')


def expert_mesh():
  """The context mesh when it splits experts over more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get('expert', 1) == 1:
    return None
  return mesh


def exchanged_swiglu(x_GxExCxD: jax.Array, w_gate_LxDxF: jax.Array, w_up_LxDxF: jax.Array,
                     w_down_LxFxD: jax.Array) -> jax.Array:
  """Inside shard_map: this device's buffers for all E experts → their outputs [G, E, C, D].

  The weights are this device's blocks: L = E / |expert| experts, D split over 'fsdp' and
  F over 'tensor'.
  """
  dtype = x_GxExCxD.dtype
  # [G, E, C, D] → [|expert|·G, L, C, D]: the slots of my experts from every device's groups.
  x_NxLxCxD = jax.lax.all_to_all(x_GxExCxD, 'expert', 1, 0, tiled=True)
  w_gate = gather_fsdp(w_gate_LxDxF, axis=1).astype(dtype)
  w_up = gather_fsdp(w_up_LxDxF, axis=1).astype(dtype)
  w_down = gather_fsdp(w_down_LxFxD, axis=2).astype(dtype)
  partial_NxLxCxD = dispatch.expert_swiglu(x_NxLxCxD, w_gate, w_up, w_down)
  # Each 'tensor' rank holds a slice of the hidden units: their contributions add up.
  y_NxLxCxD = jax.lax.psum(partial_NxLxCxD, 'tensor')
  return jax.lax.all_to_all(y_NxLxCxD, 'expert', 0, 1, tiled=True)


def run_experts(ffn, token_arrays: tuple, weights: tuple):
  """`ffn(token_arrays, weights, expert_fn)` on the whole batch, expert-parallel when the mesh
  splits experts.

  `token_arrays` lead with the dispatch-group axis G (sharded over the batch axes) and `ffn`
  must treat groups independently; `weights` are (w_gate [E, D, F], w_up, w_down [E, F, D]).
  """
  mesh = expert_mesh()
  if mesh is None:
    return ffn(token_arrays, weights, dispatch.expert_swiglu)
  return _per_device(lambda arrays, local_weights: ffn(arrays, local_weights, exchanged_swiglu),
                     mesh, token_arrays, weights)


def run_dropless(x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, weights: tuple, *,
                 num_experts: int):
  """Dropless top-k experts on the whole batch under an expert-splitting mesh:
  -> (y [G, T, D], kept [G, T, K]), as `dispatch.token_choice_ffn(..., backend='dropless')`."""
  return _per_device(
      lambda arrays, local_weights: dropless_exchanged_ffn(*arrays, *local_weights,
                                                           num_experts=num_experts),
      expert_mesh(), (x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT), weights)


def _per_device(fn, mesh, token_arrays, weights):
  """`fn(token_arrays, weights)` on every device's groups and expert-weight blocks."""
  batch = P(BATCH_AXES)
  return jax.shard_map(fn, mesh=mesh, in_specs=(batch, (IN_SPEC, IN_SPEC, OUT_SPEC)),
                       out_specs=batch)(token_arrays, weights)
