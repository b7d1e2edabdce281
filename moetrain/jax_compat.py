"""The calls whose spelling differs between the JAX versions moetrain runs on (the pinned CPU
version and the accelerator images' newer ones): one place to change when JAX moves."""

import jax


def varying_axes(x) -> frozenset:
  """The manual mesh axes over which x's type says it varies, inside `jax.shard_map` (empty
  outside it, or when check_vma=False)."""
  aval = jax.typeof(x)
  axes = getattr(aval, 'vma', None)  # JAX before 0.10
  if axes is None:
    axes = getattr(getattr(aval, 'mat', None), 'varying', frozenset())
  return frozenset(axes)


def coordination_client():
  """The client of JAX's coordination service in a multi-process run (its key-value store),
  None in a single process. JAX keeps it in a private module that has moved before."""
  from jax._src import distributed
  return distributed.global_state.client
