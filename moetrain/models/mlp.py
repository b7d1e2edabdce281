"""Dense SwiGLU feed-forward: the shape every expert shares."""

import jax
import jax.numpy as jnp
from flax import nnx

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

  def __call__(self, x_BxLxD):
    cast = lambda p: p[...].astype(self.dtype)
    return swiglu(x_BxLxD, cast(self.w_gate), cast(self.w_up), cast(self.w_down))
