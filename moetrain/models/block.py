"""The transformer block: pre-norm attention, then a dense MLP or an MoE feed-forward."""

from flax import nnx

from moetrain.models.attention import Attention
from moetrain.models.layers import RMSNorm
from moetrain.models.mla import LatentAttention
from moetrain.models.mlp import MLP
from moetrain.models.moe import MoE
from moetrain.parallel import sharding


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense MLP or an MoE feed-forward."""

  def __init__(self, config, moe: bool, *, rngs: nnx.Rngs, mesh=None):
    self.attention_norm = RMSNorm(config.d_model, config)
    self.attention = (LatentAttention(config, rngs=rngs, mesh=mesh) if config.attention == 'mla'
                      else Attention(config, rngs=rngs, mesh=mesh))
    self.ffn_norm = RMSNorm(config.d_model, config)
    self.ffn = (MoE(config, rngs=rngs, mesh=mesh) if moe else
                MLP(config, config.d_ff, rngs=rngs))
    self.mesh = mesh

  def __call__(self, x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
               rng):
    x_BxLxD = x_BxLxD + self.attention(self.attention_norm(x_BxLxD), positions_BxL,
                                       segments_BxL)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if isinstance(self.ffn, MoE):
      y_BxLxD, stats = self.ffn(h_BxLxD, mask_BxL, capacity_factor, train=train, rng=rng)
    else:
      y_BxLxD, stats = self.ffn(h_BxLxD), None
    return sharding.constrain(x_BxLxD + y_BxLxD, self.mesh, 'batch', None, None), stats

