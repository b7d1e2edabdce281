"""Small building blocks shared by the model's modules."""

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.models import fused_attention


def param(rngs: nnx.Rngs, shape, logical_axes, config, std=None) -> nnx.Param:
  """A normally initialised parameter carrying its logical axis names.

  The names are mapped to mesh axes by `parallel.sharding`; the sharding itself is applied by
  the jitted initialiser, not eagerly, so a model can be built with or without a mesh.
  """
  std = config.init_std if std is None else std
  value = std * jax.random.normal(rngs.params(), shape, jnp.dtype(config.param_dtype))
  return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


def zeros(shape, logical_axes, config) -> nnx.Param:
  """A zero-initialised parameter (biases) carrying its logical axis names."""
  return nnx.Param(jnp.zeros(shape, jnp.dtype(config.param_dtype)), out_sharding=logical_axes,
                   eager_sharding=False)


class KVCache(nnx.Variable):
  """Keys or values of the positions decoded so far, slot i holding position i."""


def attend(module, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL, segments_BxL=None,
           scale=None, kv_copies: int = 1):
  """Causal attention, by a fused kernel where the platform has one that fits on
  `module.mesh` (see `fused_attention`). With a cache on `module` (`init_cache`), this call's
  keys and values are written at their positions and each query attends to every slot up to
  its position. With `kv_copies` = C > 1 the K key/value heads serve C consecutive groups of
  query heads, each group as if alone (they are tiled C times after the cache, which holds
  them once)."""
  tile = lambda x_BxSxKxH: (jnp.tile(x_BxSxKxH, (1, 1, kv_copies, 1)) if kv_copies > 1
                            else x_BxSxKxH)
  if not hasattr(module, 'cache_k'):
    return fused_attention.attention(q_BxLxNxH, tile(k_BxLxKxH), tile(v_BxLxKxH),
                                     segments_BxL, scale, mesh=module.mesh)
  start = positions_BxL[0, 0]  # the rows of a decoding batch share positions
  for name, new in (('cache_k', k_BxLxKxH), ('cache_v', v_BxLxKxH)):
    cache = getattr(module, name)
    cache[...] = jax.lax.dynamic_update_slice_in_dim(cache[...], new.astype(cache.dtype),
                                                     start, axis=1)
  keys, values = tile(module.cache_k[...]), tile(module.cache_v[...])
  mask_Bx1xLxS = jnp.arange(keys.shape[1]) <= positions_BxL[:, None, :, None]
  # XLA: the slots a query sees follow its position, a mask neither fused kernel takes.
  return jax.nn.dot_product_attention(q_BxLxNxH, keys.astype(q_BxLxNxH.dtype),
                                      values.astype(q_BxLxNxH.dtype), mask=mask_Bx1xLxS,
                                      scale=scale, implementation='xla')


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm, computed in float32, with a learned per-channel scale."""

  def __init__(self, dim: int, config):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)),
                           out_sharding=(None,), eager_sharding=False)
    self.eps = config.norm_eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)
