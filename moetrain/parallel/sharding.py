"""Logical axis names → mesh axes: the one rules table, and every sharding derived from it.

Parameters carry logical axis names (`out_sharding` metadata on each `nnx.Param`), and so do the
activations the code pins or splits by hand (`spec`, `constrain`); the mesh layout of every
parameter, optimizer moment, batch and activation follows from `RULES`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moetrain.parallel import mesh as mesh_lib
from moetrain.parallel.mesh import BATCH_AXES

RULES = {
    # Activations and batches: sequences (and dispatch groups of whole sequences) are split
    # over every data-holding axis.
    'batch': BATCH_AXES,
    'vocab': 'tensor',
    # Expert-parallel ranks hold different data, so for every weight that is not an expert's
    # they are FSDP ranks too.
    'embed': ('fsdp', 'expert'),
    # An expert weight's model dimension: its 'expert' axis is split by expert already.
    'expert_embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'q_lora': None,
    'kv_lora': None,
    'expert': 'expert',
    'router': None,
    'layers': None,
    # Pipeline parallelism: the main layer stack's units (and the activations in flight, one
    # microbatch per stage) split over the stages; a circular schedule's rounds are not split.
    'stage_layers': 'stage',
    'stages': 'stage',
    'layer_repeats': None,
}

# The routed experts' weights: w_gate and w_up [E, D, F], w_down [E, F, D].
EXPERT_IN_AXES = ('expert', 'expert_embed', 'mlp')
EXPERT_OUT_AXES = ('expert', 'mlp', 'expert_embed')


def logical_to_spec(logical_axes, mesh_axes=None) -> PartitionSpec:
  """Maps a tuple of logical axis names (None = replicated) to a mesh PartitionSpec; a mesh
  axis already used by an earlier dimension is left out of later ones, and so is one that
  `mesh_axes` (when given) does not have."""
  if not logical_axes:
    return PartitionSpec()
  used, spec = set(), []
  for name in logical_axes:
    rule = RULES[name] if name else None
    axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ())
                 if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def spec(mesh, *logical_axes) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes on `mesh` (axes it lacks dropped)."""
  return logical_to_spec(logical_axes, tuple(mesh.axis_names))


def manual_spec(mesh, *logical_axes) -> PartitionSpec:
  """`spec` for `jax.shard_map`, without the mesh axes of size 1: an array split one way is
  whole on every device, and shard_map then knows it does not vary along them (so summing
  over such an axis needs no all-reduce)."""
  def kept(entry):
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                 if mesh.shape[a] > 1)
    return axes[0] if len(axes) == 1 else (axes or None)
  return PartitionSpec(*(kept(entry) for entry in spec(mesh, *logical_axes)))


def shards(mesh, *logical_axes) -> int:
  """Into how many pieces `mesh` splits an array along these logical axes together (1 without
  a mesh)."""
  if mesh is None:
    return 1
  count = 1
  for entry in spec(mesh, *logical_axes):
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      count *= mesh.shape[axis]
  return count


def param_shardings(abstract_state: nnx.State, mesh: Mesh):
  """A pure-dict tree of NamedShardings for the parameters of an abstract model state."""
  specs = jax.tree.map(
      lambda v: NamedSharding(mesh, logical_to_spec(v.get_metadata().get('out_sharding'))),
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of `[batch, seq]` arrays: sequences split over all data-holding axes."""
  return NamedSharding(mesh, spec(mesh, 'batch', None))


def process_rows(batch: NamedSharding, batch_size: int) -> np.ndarray:
  """The rows of a `[batch_size, seq]` array with sharding `batch` that this process's devices
  hold, in increasing order: the lanes its data pipeline makes (`data.pipeline`)."""
  rows = set()
  for index in batch.addressable_devices_indices_map((batch_size, 1)).values():
    rows.update(range(*index[0].indices(batch_size)))
  return np.array(sorted(rows), np.int64)


def constrain(x: jax.Array, mesh, *logical_axes) -> jax.Array:
  """Pins an activation to the layout its logical axes give on `mesh` (None: left as it is).

  Applied at block edges, so the layout between blocks never depends on how GSPMD
  propagates through attention and the experts.
  """
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(mesh, *logical_axes)))


def on_local_groups(mesh, fn, *arrays_G):
  """`fn(*arrays_G)` on each device's own dispatch groups (the arrays' leading axis, split over
  the batch axes), its results split the same way; `fn(*arrays_G)` itself without a mesh.

  For per-group work GSPMD would otherwise replicate: XLA's partitioners gather a top_k's
  whole operand onto every device (all groups' router scores, in every MoE layer) rather than
  keep the split of its batch dimensions.
  """
  if mesh is None:
    return fn(*arrays_G)
  batch = spec(mesh, 'batch')
  # As in the expert exchange: under pipeline stages' vmap the types are not checked.
  return jax.shard_map(fn, mesh=mesh, in_specs=(batch,) * len(arrays_G), out_specs=batch,
                       check_vma=mesh_lib.stages(mesh) == 1)(*arrays_G)


def local_chunk(x_B, chunk: int, chunks: int, mesh):
  """Chunk `chunk` of `chunks` of every device's rows of `x_B` (leading axis split over the
  batch axes): each device's rows in `chunks` consecutive runs, run `chunk` of each -> [B/n, …],
  split as `x_B` was, so taking it moves nothing."""
  split = x_B.reshape(shards(mesh, 'batch'), chunks, -1, *x_B.shape[1:])
  return split[:, chunk].reshape(-1, *x_B.shape[1:])


def join_local_chunks(chunks_B: list, mesh):
  """The inverse of `local_chunk`: every device's chunks back in order -> [B, …]."""
  first = chunks_B[0]
  joined = jnp.stack([c.reshape(shards(mesh, 'batch'), -1, *first.shape[1:]) for c in chunks_B],
                     axis=1)
  return joined.reshape(-1, *first.shape[1:])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
