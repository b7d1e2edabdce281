"""Multi-head latent attention (DeepSeek-V2/V3): queries and keys/values pass through low-rank
latents; a rotary part of each query meets one rotary key shared by all heads.

Channel layout per head: queries and keys are [no-rope part, rope part], values separate. The
rope part uses the GPT-NeoX pair layout; checkpoints in DeepSeek's interleaved layout are
permuted on conversion, which leaves every attention score unchanged.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from moetrain.models import fp8, rope
from moetrain.models.layers import RMSNorm, attend, param


class LatentAttention(nnx.Module):
  """MLA with `q_lora_rank` (0: full-rank queries) and `kv_lora_rank` latents."""

  def __init__(self, config, *, rngs: nnx.Rngs, mesh=None):
    d, n = config.d_model, config.num_heads
    nope, rot, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    if config.q_lora_rank:
      self.wq_a = param(rngs, (d, config.q_lora_rank), ('embed', 'q_lora'), config)
      self.q_norm = RMSNorm(config.q_lora_rank, config)
      self.wq_b = param(rngs, (config.q_lora_rank, n, nope + rot), ('q_lora', 'heads', 'head_dim'),
                        config)
    else:
      self.wq = param(rngs, (d, n, nope + rot), ('embed', 'heads', 'head_dim'), config)
    self.wkv_a = param(rngs, (d, config.kv_lora_rank + rot), ('embed', 'kv_lora'), config)
    self.kv_norm = RMSNorm(config.kv_lora_rank, config)
    self.wkv_b = param(rngs, (config.kv_lora_rank, n, nope + v), ('kv_lora', 'heads', 'head_dim'),
                       config)
    self.wo = param(rngs, (n, v, d), ('heads', 'head_dim', 'embed'), config)
    self.sizes = (nope, rot, v)
    scaling = ml_collections.FrozenConfigDict(config.rope_scaling)
    self.rope = (rot, config.rope_theta, scaling)
    self.scale = rope.softmax_scale(nope + rot, scaling)
    self.dtype = jnp.dtype(config.dtype)
    self.fp8 = config.fp8
    self.mesh = mesh  # where a fused kernel runs per device

  def cache_shapes(self, batch: int, length: int) -> tuple:
    """Shapes of the cached (per-head, expanded) keys and zero-padded values."""
    nope, rot, _ = self.sizes
    heads = self.wo.shape[-3]
    return (batch, length, heads, nope + rot), (batch, length, heads, nope + rot)

  def __call__(self, x_BxLxD, positions_BxL, segments_BxL=None):
    weight = lambda p: fp8.weight(self.fp8, p, self.dtype)
    matmul = fp8.matmul(self.fp8)
    project = lambda spec, x, p: fp8.einsum(self.fp8, spec, x, weight(p))
    nope, rot, v_dim = self.sizes
    if hasattr(self, 'wq_a'):
      q_latent = self.q_norm(matmul(x_BxLxD, weight(self.wq_a)))
      q_BxLxNxQ = project('blr,rnq->blnq', q_latent, self.wq_b)
    else:
      q_BxLxNxQ = project('bld,dnq->blnq', x_BxLxD, self.wq)
    kv_a = matmul(x_BxLxD, weight(self.wkv_a))
    kv_latent, k_rot_BxLxR = kv_a[..., :-rot], kv_a[..., -rot:]
    kv_BxLxNxF = project('blr,rnf->blnf', self.kv_norm(kv_latent), self.wkv_b)
    k_nope, v_BxLxNxV = kv_BxLxNxF[..., :nope], kv_BxLxNxF[..., nope:]

    inv_freq, factor = rope.frequencies(*self.rope)
    q_rot = rope.rotate(q_BxLxNxQ[..., nope:], positions_BxL, inv_freq, factor)
    k_rot = rope.rotate(k_rot_BxLxR[:, :, None, :], positions_BxL, inv_freq, factor)
    q = jnp.concatenate([q_BxLxNxQ[..., :nope], q_rot], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot, (*k_nope.shape[:3], rot))], axis=-1)
    # The fused attention wants one head width: values are zero-padded, the padding cut off.
    v = jnp.pad(v_BxLxNxV, ((0, 0),) * 3 + ((0, nope + rot - v_dim),))
    out = attend(self, q, k, v, positions_BxL, segments_BxL, scale=self.scale)
    return project('blnv,nvd->bld', out[..., :v_dim], self.wo)
