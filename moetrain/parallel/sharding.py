"""Logical axis names → mesh axes: the one rules table, and shardings derived from it.

Parameters carry logical axis names (`out_sharding` metadata on each `nnx.Param`); the mesh
layout of every parameter, optimizer moment and batch follows from `RULES`.
"""

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moetrain.parallel.mesh import BATCH_AXES

RULES = {
    'batch': BATCH_AXES,
    'vocab': 'tensor',
    # Expert-parallel ranks hold different data, so for every weight that is not an expert's
    # they are FSDP ranks too; an expert's `embed` takes only 'fsdp' (its 'expert' axis is
    # split by expert already).
    'embed': ('fsdp', 'expert'),
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'q_lora': None,
    'kv_lora': None,
    'expert': 'expert',
    'router': None,
    'layers': None,
}


def logical_to_spec(logical_axes) -> PartitionSpec:
  """Maps a tuple of logical axis names (None = replicated) to a mesh PartitionSpec; a mesh
  axis already used by an earlier dimension is left out of later ones."""
  if not logical_axes:
    return PartitionSpec()
  used, spec = set(), []
  for name in logical_axes:
    rule = RULES[name] if name else None
    axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh):
  """A pure-dict tree of NamedShardings for the parameters of an abstract model state."""
  specs = jax.tree.map(
      lambda v: NamedSharding(mesh, logical_to_spec(v.get_metadata().get('out_sharding'))),
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of `[batch, seq]` arrays: sequences split over all data-holding axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def constrain_batch(x_BxLxD: jax.Array) -> jax.Array:
  """Pins an activation's batch axis to the batch axes of the context mesh, if one is set.

  Applied at block edges, so the layout between blocks never depends on how GSPMD
  propagates through attention and the experts.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x_BxLxD
  return jax.lax.with_sharding_constraint(x_BxLxD, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
