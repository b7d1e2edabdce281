"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 §2.2): `model.mtp_layers` = D modules
after the main model, module k (1 … D) predicting the token k + 1 positions ahead.

At position i, module k combines the previous depth's hidden state h^{k-1}_i (for k = 1 the
main model's last block output, before its final norm) with the embedding of token t_{i+k}:

    h'_i      = W_eh · [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h^{k-1}_i)]      W_eh: [2D, D]
    h^k       = Block_k(h')                       (dense or MoE, as layer N + k - 1 would be)
    logits^k  = Head(RMSNorm_k(h^k))              predicting t_{i+k+1}

Emb and Head are the main model's (shared). The embedding comes first in the concatenation, as
in DeepSeek-V3's released weights (`eh_proj`); the paper writes the hidden state first. The
last k positions of a row have no token t_{i+k}: they hold `fill` and are masked.
"""

import jax.numpy as jnp
from flax import nnx

from moetrain.models.block import Block
from moetrain.models.layers import RMSNorm, param
from moetrain.models.plan import is_moe_layer


class MultiTokenPrediction(nnx.Module):
  """One MTP module: its two input norms, the 2D → D projection, a block and an output norm.
  `layer` is the block's index in the model's layer numbering (N + k - 1 for depth k)."""

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs, mesh=None):
    d = config.d_model
    self.enorm = RMSNorm(d, config)
    self.hnorm = RMSNorm(d, config)
    self.eh_proj = param(rngs, (2 * d, d), ('mlp', 'embed'), config)
    self.block = Block(config, is_moe_layer(config, layer), rngs=rngs, mesh=mesh)
    self.norm = RMSNorm(d, config)
    self.dtype = jnp.dtype(config.dtype)

  def combine(self, h_BxLxD, embedded_BxLxD):
    """W_eh · [RMSNorm_e(embedding); RMSNorm_h(h)] → [B, L, D], the block's input."""
    both_BxLx2D = jnp.concatenate([self.enorm(embedded_BxLxD), self.hnorm(h_BxLxD)], axis=-1)
    return both_BxLx2D @ self.eh_proj[...].astype(self.dtype)


def shift_left(x_BxL, k: int, fill):
  """x[..., i + k] at position i; the last k positions of each row hold `fill`: [..., B, L] →
  [..., B, L]."""
  return jnp.pad(x_BxL[..., k:], [(0, 0)] * (x_BxL.ndim - 1) + [(0, k)], constant_values=fill)
