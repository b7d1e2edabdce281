"""Decoder-only language model: embeddings, pre-norm blocks (dense or MoE), tied unembedding."""

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.models.attention import Attention
from moetrain.models.layers import RMSNorm, param
from moetrain.models.mlp import MLP
from moetrain.models.moe import MoE

# Routing statistics every MoE layer reports; stacked over MoE layers as [num_moe_layers, ...].
STAT_SHAPES = {'aux_loss': (), 'z_loss': (), 'expert_fraction': ('E',), 'max_load': (),
               'dropped_fraction': (), 'experts_per_token': (), 'router_entropy': (),
               'router_bias': ('E',)}


def is_moe_layer(config, index: int) -> bool:
  """Every `layer_interval`-th block after `first_dense_layers` is MoE (Qwen's sparse step)."""
  moe = config.moe
  if not moe.num_experts or index < moe.first_dense_layers:
    return False
  return (index - moe.first_dense_layers + 1) % moe.layer_interval == 0


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense MLP or an MoE feed-forward."""

  def __init__(self, config, moe: bool, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(config.d_model, config)
    self.attention = Attention(config, rngs=rngs)
    self.ffn_norm = RMSNorm(config.d_model, config)
    self.ffn = MoE(config, rngs=rngs) if moe else MLP(config, config.d_ff, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_BxL, capacity_factor, train, rng):
    x_BxLxD = x_BxLxD + self.attention(self.attention_norm(x_BxLxD), positions_BxL)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if isinstance(self.ffn, MoE):
      y_BxLxD, stats = self.ffn(h_BxLxD, mask_BxL, capacity_factor, train=train, rng=rng)
    else:
      y_BxLxD, stats = self.ffn(h_BxLxD), None
    return x_BxLxD + y_BxLxD, stats


class Transformer(nnx.Module):
  """The LM. `model(tokens_BxL)` gives float32 logits [B, L, vocab], routing dropless."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.embed = param(rngs, (config.vocab_size, config.d_model), ('vocab', 'embed'), config)
    self.blocks = nnx.List([Block(config, is_moe_layer(config, i), rngs=rngs)
                            for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, config)
    self.unembed = (None if config.tie_embeddings else
                    param(rngs, (config.d_model, config.vocab_size), ('embed', 'vocab'), config))
    self.num_experts = config.moe.num_experts
    # Expert choice routes each token by comparing it with later tokens of its group.
    self.causal = not (config.moe.num_experts and config.moe.router == 'expert_choice')
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, tokens_BxL):
    return self.forward(tokens_BxL)[0]

  def forward(self, tokens_BxL, mask_BxL=None, capacity_factor: float = 0.0, *,
              train: bool = False, rng=None):
    """Logits [B, L, V] (float32) and routing statistics stacked over MoE layers.

    `mask_BxL` marks real tokens (padding is kept out of routing statistics and capacity);
    `capacity_factor <= 0` routes dropless. `train=True` enables router jitter (drawn from
    `rng`) and updates the balancing biases in place.
    """
    if mask_BxL is None:
      mask_BxL = jnp.ones(tokens_BxL.shape, jnp.bool_)
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.dtype)
    layer_stats = []
    for index, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, index)
      x_BxLxD, stats = block(x_BxLxD, positions_BxL, mask_BxL, capacity_factor, train,
                             layer_rng)
      if stats is not None:
        layer_stats.append(stats)
    x_BxLxD = self.final_norm(x_BxLxD)
    unembed = self.embed[...].T if self.unembed is None else self.unembed[...]
    logits_BxLxV = jnp.einsum('bld,dv->blv', x_BxLxD, unembed.astype(self.dtype))
    return logits_BxLxV.astype(jnp.float32), self._stack(layer_stats)

  def _stack(self, layer_stats):
    if layer_stats:
      return jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats)
    shape = lambda dims: (0,) + tuple(self.num_experts if d == 'E' else d for d in dims)
    return {name: jnp.zeros(shape(dims), jnp.float32) for name, dims in STAT_SHAPES.items()}
