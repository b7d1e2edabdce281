"""Small building blocks shared by the model's modules."""

import jax
import jax.numpy as jnp
from flax import nnx


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


def same_segment(segments_BxL):
  """Attention mask [B, 1, L, L]: query and key in the same segment (None: no segments)."""
  if segments_BxL is None:
    return None
  return segments_BxL[:, None, :, None] == segments_BxL[:, None, None, :]


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
