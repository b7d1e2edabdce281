"""Causal self-attention with grouped-query heads and rotary position embeddings."""

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.models.layers import param


def rotary(x_BxLxNxH, positions_BxL, theta: float):
  """Rotates channel pairs (i, i + H/2) by position-dependent angles (RoPE, GPT-NeoX layout)."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_BxLxH2)[:, :, None, :]
  cos = jnp.cos(angles_BxLxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
  """Multi-head causal attention; `num_kv_heads < num_heads` shares each K/V head (GQA)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    d, n, kv = config.d_model, config.num_heads, config.num_kv_heads
    h = config.head_dim or d // n
    self.wq = param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), config)
    self.wk = param(rngs, (d, kv, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wv = param(rngs, (d, kv, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wo = param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), config)
    self.theta = config.rope_theta
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x_BxLxD, positions_BxL):
    cast = lambda p: p[...].astype(self.dtype)
    q = rotary(jnp.einsum('bld,dnh->blnh', x_BxLxD, cast(self.wq)), positions_BxL, self.theta)
    k = rotary(jnp.einsum('bld,dkh->blkh', x_BxLxD, cast(self.wk)), positions_BxL, self.theta)
    v = jnp.einsum('bld,dkh->blkh', x_BxLxD, cast(self.wv))
    out_BxLxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jnp.einsum('blnh,nhd->bld', out_BxLxNxH, cast(self.wo))
