"""Causal self-attention: grouped-query heads, rotary embeddings, optional q/k/v biases and
query/key RMSNorm (per head as in Qwen3, or over the whole projection as in OLMoE).

With `model.attention_experts` = A > 0 (BAM, Zhang et al. 2024) the layer is a soft mixture
of A attentions of `num_heads` heads each, every one computed and weighted per token by a
softmax router. The A experts are one attention of A·N query heads: query head a·N + j is
expert a's head j, so one fused kernel and the head sharding of the rules table serve them.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import fp8, rope
from moetrain.models.layers import RMSNorm, attend, param, zeros


class ExpertRMSNorm(RMSNorm):
  """RMSNorm with a scale of its own per attention expert: x [..., A, W], scale [A, W]."""

  def __init__(self, experts: int, dim: int, config):  # pylint: disable=super-init-not-called
    self.scale = nnx.Param(jnp.ones((experts, dim), jnp.dtype(config.param_dtype)),
                           out_sharding=(None, None), eager_sharding=False)
    self.eps = config.norm_eps


def expert_norm(norm: ExpertRMSNorm, x_BxLxNxH, per_head: bool):
  """`norm` over each expert's heads of x [B, L, A·M, H]: per head or over its M·H channels."""
  b, l, heads, h = x_BxLxNxH.shape
  experts = norm.scale.shape[0]
  x_BxLxAxMxH = x_BxLxNxH.reshape(b, l, experts, heads // experts, h)
  if per_head:
    y = norm(x_BxLxAxMxH.swapaxes(2, 3)).swapaxes(2, 3)
  else:
    y = norm(x_BxLxAxMxH.reshape(b, l, experts, -1))
  return y.reshape(x_BxLxNxH.shape)


def mix_experts(out_BxLxNxH, weights_BxLxA):
  """Each expert's head outputs [B, L, A·N, H] scaled by its router weight [B, L, A]."""
  b, l, heads, h = out_BxLxNxH.shape
  experts = weights_BxLxA.shape[-1]
  out_BxLxAxNxH = out_BxLxNxH.reshape(b, l, experts, heads // experts, h)
  scaled = out_BxLxAxNxH * weights_BxLxA[..., None, None].astype(out_BxLxNxH.dtype)
  return scaled.reshape(out_BxLxNxH.shape)


class Attention(nnx.Module):
  """Multi-head causal attention; `num_kv_heads < num_heads` shares each K/V head (GQA)."""

  def __init__(self, config, *, rngs: nnx.Rngs, mesh=None):
    d, n, kv = config.d_model, config.num_heads, config.num_kv_heads
    h = config.head_dim or d // n
    experts = config.attention_experts
    self.share_kv = bool(experts) and config.attention_experts_share_kv
    # Query heads of all experts; key/value heads projected (one set when shared).
    n_all = max(experts, 1) * n
    kv_all = kv if self.share_kv else max(experts, 1) * kv
    self.wq = param(rngs, (d, n_all, h), ('embed', 'heads', 'head_dim'), config)
    self.wk = param(rngs, (d, kv_all, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wv = param(rngs, (d, kv_all, h), ('embed', 'kv_heads', 'head_dim'), config)
    self.wo = param(rngs, (n_all, h, d), ('heads', 'head_dim', 'embed'), config)
    if config.attention_bias:
      self.q_bias = zeros((n_all, h), ('heads', 'head_dim'), config)
      self.k_bias = zeros((kv_all, h), ('kv_heads', 'head_dim'), config)
      self.v_bias = zeros((kv_all, h), ('kv_heads', 'head_dim'), config)
    self.experts = experts
    if experts:
      # Zeros: the mixture starts uniform, so upcycled experts start as their mean.
      self.attention_router = zeros((d, experts), ('embed', 'router'), config)
    self.qk_norm = config.qk_norm
    self.mesh = mesh  # where a fused kernel runs per device
    if config.qk_norm != 'none':
      per_head = config.qk_norm == 'per_head'
      q_width, kv_width = (h, h) if per_head else (n * h, kv * h)
      self.q_norm = (ExpertRMSNorm(experts, q_width, config) if experts
                     else RMSNorm(q_width, config))
      self.k_norm = (ExpertRMSNorm(experts, kv_width, config) if experts and not self.share_kv
                     else RMSNorm(kv_width, config))
    self.rope = (h, config.rope_theta, ml_collections.FrozenConfigDict(config.rope_scaling))
    self.dtype = jnp.dtype(config.dtype)
    self.fp8 = config.fp8

  def cache_shapes(self, batch: int, length: int) -> tuple:
    """Shapes of the cached keys and values for `batch` sequences of `length` positions
    (shared keys/values once, for every expert)."""
    _, kv, h = self.wk.shape[-3:]
    return (batch, length, kv, h), (batch, length, kv, h)

  def _norm(self, norm, x_BxLxNxH):
    if isinstance(norm, ExpertRMSNorm):
      return expert_norm(norm, x_BxLxNxH, self.qk_norm == 'per_head')
    if self.qk_norm == 'per_head':
      return norm(x_BxLxNxH)
    return norm(x_BxLxNxH.reshape(*x_BxLxNxH.shape[:2], -1)).reshape(x_BxLxNxH.shape)

  def router_weights(self, x_BxLxD):
    """The experts' mixture weights [B, L, A]: a float32 softmax of the router logits."""
    logits_BxLxA = jnp.einsum('bld,da->bla', x_BxLxD.astype(jnp.float32),
                              self.attention_router[...].astype(jnp.float32))
    return jax.nn.softmax(logits_BxLxA, axis=-1)

  def __call__(self, x_BxLxD, positions_BxL, segments_BxL=None):
    cast = lambda p: p[...].astype(self.dtype)
    weight = lambda p: fp8.weight(self.fp8, p, self.dtype)
    project = lambda spec, x, p: fp8.einsum(self.fp8, spec, x, weight(p))
    q = project('bld,dnh->blnh', x_BxLxD, self.wq)
    k = project('bld,dkh->blkh', x_BxLxD, self.wk)
    v = project('bld,dkh->blkh', x_BxLxD, self.wv)
    if hasattr(self, 'q_bias'):
      q, k, v = q + cast(self.q_bias), k + cast(self.k_bias), v + cast(self.v_bias)
    if self.qk_norm != 'none':
      q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
    inv_freq, factor = rope.frequencies(*self.rope)
    q = rope.rotate(q, positions_BxL, inv_freq, factor)
    k = rope.rotate(k, positions_BxL, inv_freq, factor)
    # Shared keys and values serve each expert's query heads in turn.
    out_BxLxNxH = attend(self, q, k, v, positions_BxL, segments_BxL,
                         kv_copies=self.experts if self.share_kv else 1)
    if self.experts:
      out_BxLxNxH = mix_experts(out_BxLxNxH, self.router_weights(x_BxLxD))
    return project('blnh,nhd->bld', out_BxLxNxH, self.wo)
