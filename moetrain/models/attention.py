"""Causal self-attention: grouped-query heads, rotary embeddings, optional q/k/v biases and
query/key RMSNorm (per head as in Qwen3, or over the whole projection as in OLMoE)."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import fp8, rope
from moetrain.models.layers import RMSNorm, attend, param, zeros


class Attention(nnx.Module):
  """Multi-head causal attention; `num_kv_heads < num_heads` shares each K/V head (GQA)."""

  def __init__(self, config, *, rngs: nnx.Rngs, mesh=None):
    d, n, kv = config.d_model, config.num_heads, config.num_kv_heads
    h = config.head_dim or d // n
    self.wq = param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), config)
    self.wk = param(rngs, (d, kv, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wv = param(rngs, (d, kv, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wo = param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), config)
    if config.attention_bias:
      self.q_bias = zeros((n, h), ('heads', 'head_dim'), config)
      self.k_bias = zeros((kv, h), ('kv_heads', 'head_dim'), config)
      self.v_bias = zeros((kv, h), ('kv_heads', 'head_dim'), config)
    self.qk_norm = config.qk_norm
    self.mesh = mesh  # where a fused kernel runs per device
    if config.qk_norm != 'none':
      per_head = config.qk_norm == 'per_head'
      self.q_norm = RMSNorm(h if per_head else n * h, config)
      self.k_norm = RMSNorm(h if per_head else kv * h, config)
    self.rope = (h, config.rope_theta, ml_collections.FrozenConfigDict(config.rope_scaling))
    self.dtype = jnp.dtype(config.dtype)
    self.fp8 = config.fp8

  def cache_shapes(self, batch: int, length: int) -> tuple:
    """Shapes of the cached keys and values for `batch` sequences of `length` positions."""
    _, kv, h = self.wk.shape[-3:]
    return (batch, length, kv, h), (batch, length, kv, h)

  def __call__(self, x_BxLxD, positions_BxL, segments_BxL=None):
    cast = lambda p: p[...].astype(self.dtype)
    weight = lambda p: fp8.weight(self.fp8, p, self.dtype)
    project = lambda spec, x, p: fp8.einsum(self.fp8, spec, x, weight(p))
    q = project('bld,dnh->blnh', x_BxLxD, self.wq)
    k = project('bld,dkh->blkh', x_BxLxD, self.wk)
    v = project('bld,dkh->blkh', x_BxLxD, self.wv)
    if hasattr(self, 'q_bias'):
      q, k, v = q + cast(self.q_bias), k + cast(self.k_bias), v + cast(self.v_bias)
    if self.qk_norm == 'per_head':
      q, k = self.q_norm(q), self.k_norm(k)
    elif self.qk_norm == 'full':
      q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    inv_freq, factor = rope.frequencies(*self.rope)
    q = rope.rotate(q, positions_BxL, inv_freq, factor)
    k = rope.rotate(k, positions_BxL, inv_freq, factor)
    out_BxLxNxH = attend(self, q, k, v, positions_BxL, segments_BxL)
    return project('blnh,nhd->bld', out_BxLxNxH, self.wo)
