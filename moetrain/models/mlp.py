"""Dense SwiGLU feed-forward: the shape every expert shares."""

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.models import fp8
from moetrain.models.layers import param


def swiglu(x, w_gate, w_up, w_down, matmul=jnp.matmul):
  """`W_down(silu(x·W_gate) ⊙ (x·W_up))` over the last axis of x: [..., D] → [..., D].

  The one SwiGLU of every path: a dense MLP, experts batched over their capacity buffers
  (x [E, B, D] with weights [E, D, F]) or experts on sorted rows (`matmul` a grouped matmul).
  """
  return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


class MLP(nnx.Module):
  """SwiGLU MLP with hidden width `d_ff`."""

  def __init__(self, config, d_ff: int, *, rngs: nnx.Rngs):
    d = config.d_model
    self.w_gate = param(rngs, (d, d_ff), ('embed', 'mlp'), config)
    self.w_up = param(rngs, (d, d_ff), ('embed', 'mlp'), config)
    self.w_down = param(rngs, (d_ff, d), ('mlp', 'embed'), config)
    self.dtype = jnp.dtype(config.dtype)
    self.fp8 = config.fp8

  def __call__(self, x_BxLxD):
    weights = (fp8.weight(self.fp8, w, self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    return swiglu(x_BxLxD, *weights, matmul=fp8.matmul(self.fp8))
