"""The transformer block: pre-norm attention, then a dense MLP or an MoE feed-forward."""

import jax
from flax import nnx

from moetrain.models import pipeline, routing, routing_stats
from moetrain.models.attention import Attention
from moetrain.models.layers import RMSNorm
from moetrain.models.mla import LatentAttention
from moetrain.models.mlp import MLP
from moetrain.models.moe import MoE
from moetrain.parallel import sharding


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense MLP or an MoE feed-forward.

  An MoE block with `model.moe.exchange_overlap=block` runs each device's rows in
  `exchange_chunks` independent chunks through the whole block (two-batch overlap): one chunk's
  expert exchange has no data dependence on another chunk's attention, experts or shared
  experts, so the scheduler can hide it behind them.
  """

  def __init__(self, config, moe: bool, *, rngs: nnx.Rngs, mesh=None):
    self.attention_norm = RMSNorm(config.d_model, config)
    self.attention = (LatentAttention(config, rngs=rngs, mesh=mesh) if config.attention == 'mla'
                      else Attention(config, rngs=rngs, mesh=mesh))
    self.ffn_norm = RMSNorm(config.d_model, config)
    self.ffn = (MoE(config, rngs=rngs, mesh=mesh) if moe else
                MLP(config, config.d_ff, rngs=rngs))
    self.mesh = mesh
    block_chunks = moe and config.moe.exchange_overlap == 'block'
    self.chunks = (config.moe.exchange_chunks or 1) if block_chunks else 1

  def __call__(self, x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
               rng):
    chunks = self.chunks
    if chunks > 1:
      groups = x_BxLxD.shape[0] // sharding.shards(self.mesh, 'batch') // self.ffn.moe.group_size
      chunks = pipeline.chunk_count(groups, chunks)
    if chunks == 1:
      return self._rows(x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
                        rng)
    moe, length = self.ffn.moe, x_BxLxD.shape[1]
    outputs, units = [], []
    for chunk in range(chunks):
      rows = [None if a is None else sharding.local_chunk(a, chunk, chunks, self.mesh)
              for a in (x_BxLxD, positions_BxL, segments_BxL, mask_BxL)]
      chunk_rng = None if rng is None else jax.random.fold_in(rng, chunk)
      outputs.append(self._rows(*rows, capacity_factor, train, chunk_rng))
      chunk_mask_BxL = rows[-1]
      # Each chunk's balance loss counts by its units, so that the merged one is the block's.
      units.append(routing.balance_units(chunk_mask_BxL.reshape(-1, moe.group_size * length),
                                         mode=moe.aux_loss, seq_len=length))
    y_BxLxD = sharding.join_local_chunks([y for y, _ in outputs], self.mesh)
    return (sharding.constrain(y_BxLxD, self.mesh, 'batch', None, None),
            routing_stats.merge_chunks([stats for _, stats in outputs], units))

  def _rows(self, x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train, rng):
    x_BxLxD = x_BxLxD + self.attention(self.attention_norm(x_BxLxD), positions_BxL,
                                       segments_BxL)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if isinstance(self.ffn, MoE):
      y_BxLxD, stats = self.ffn(h_BxLxD, mask_BxL, capacity_factor, train=train, rng=rng)
    else:
      y_BxLxD, stats = self.ffn(h_BxLxD), None
    return sharding.constrain(x_BxLxD + y_BxLxD, self.mesh, 'batch', None, None), stats
