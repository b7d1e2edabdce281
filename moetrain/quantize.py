"""Float8 quantisation with float32 scales over blocks: the one quantiser of every FP8 path.

An array is cut into blocks over its trailing axes (`blocks`: one block size per trailing axis;
0 takes the whole axis as one block) and every block gets its own float32 scale = amax ·
float32(1 / MAX), MAX the largest finite value of the float8 type (448 for e4m3fn, 57344 for
e5m2); q = x / scale clipped to ±MAX and cast. So:
- (128,) over the last axis: DeepSeek-V3's 1×128 activation blocks (and the FP8 exchange's);
- (128, 128) over the last two axes: its 128×128 weight blocks, leading (expert) axes kept;
- (0,) * ndim: one scale per tensor; (0, 0) over a stack of matrices: one per matrix.
An axis that is not a multiple of its block ends in one shorter block, scaled over the values it
has (the zeros it is padded with change no amax); a block of zeros gets scale 1, so it stays 0.

amax / MAX is spelled as a product with float32(1 / MAX): XLA:CPU rewrites the division into it,
so it is spelled out for every backend, and every numpy reference, to round the same way.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 128
E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E5M2 = jnp.dtype(jnp.float8_e5m2)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How `model.fp8` quantises a matmul: activations and output gradients in rows of `block`
  values along the axis they are contracted over (x [..., K], dy [..., N]), weights [..., K, N]
  in block × block tiles (each matrix of a stack its own); `block` 0 gives one scale per
  tensor, weight stacks included. Activations and weights are e4m3fn, gradients `gradient`."""
  block: int
  gradient: jnp.dtype

  def row_blocks(self, ndim: int) -> tuple:
    """Blocks of an activation or gradient of `ndim` axes, flattened to [..., K]."""
    return (self.block,) if self.block else (0,) * ndim

  def tile_blocks(self, ndim: int) -> tuple:
    """Blocks of a weight of `ndim` axes, flattened to [..., K, N]."""
    return (self.block, self.block) if self.block else (0,) * ndim


# Transformer Engine's tensor-scaled "hybrid" format (e5m2's range for gradients) and
# DeepSeek-V3's 1×128 / 128×128 blocks (e4m3fn throughout: blocks need less range).
RECIPES = {'tensorwise': Recipe(0, E5M2), 'blockwise': Recipe(BLOCK, E4M3)}


def max_value(dtype) -> float:
  """The largest finite value of a float8 type: 448 (e4m3fn), 57344 (e5m2)."""
  return float(jnp.finfo(dtype).max)


def num_blocks(size: int, block: int) -> int:
  """Blocks of an axis of `size` values: ceil(size / block); 1 when `block` is 0 (whole)."""
  return -(-size // block) if block and block < size else 1


def scale_shape(shape, blocks) -> tuple:
  """Shape of the scales of an array of `shape` quantised over `blocks` (trailing axes)."""
  lead = len(shape) - len(blocks)
  return (*shape[:lead], *(num_blocks(n, b) for n, b in zip(shape[lead:], blocks)))


def _is_split(n: int, block: int) -> bool:
  return bool(block) and block < n


def _split(x, blocks):
  """x → its blocks: every trailing axis with a block smaller than itself padded with zeros to
  B·b and split into [B, b]; whole-axis blocks left as they are. -> (the split array, the axes
  each block spans in it, the axes the split added)."""
  lead = x.ndim - len(blocks)
  pads, shape, spans, added = [(0, 0)] * lead, list(x.shape[:lead]), [], []
  for n, b in zip(x.shape[lead:], blocks):
    if _is_split(n, b):
      pads.append((0, num_blocks(n, b) * b - n))
      added.append(len(shape) + 1)
      shape += [num_blocks(n, b), b]
    else:
      pads.append((0, 0))
      shape.append(n)
    spans.append(len(shape) - 1)
  padded = jnp.pad(x, pads) if any(p for _, p in pads) else x
  return padded.reshape(shape), tuple(spans), tuple(added)


def _merge(x_split, shape, blocks):
  """The inverse of `_split`: back to `shape`, padding cut off."""
  lead = len(shape) - len(blocks)
  padded = [*shape[:lead], *(num_blocks(n, b) * b if _is_split(n, b) else n
                             for n, b in zip(shape[lead:], blocks))]
  merged = x_split.reshape(padded)
  if tuple(padded) == tuple(shape):
    return merged
  return merged[tuple(slice(0, n) for n in shape)]


def quantize(x: jax.Array, blocks: tuple, dtype=E4M3,
             reduce_amax=None) -> tuple[jax.Array, jax.Array]:
  """-> (q: x's shape in `dtype`, scales float32 `scale_shape(x.shape, blocks)`) with x ≈ q ·
  the scale of its block. `reduce_amax` (e.g. a pmax) combines the block maxima of shards that
  make up one block, so a shard is quantised as its part of the whole array."""
  maximum = max_value(dtype)
  x_split, spans, added = _split(x.astype(jnp.float32), blocks)
  amax = jnp.max(jnp.abs(x_split), axis=spans, keepdims=True)
  if reduce_amax is not None:
    amax = reduce_amax(amax)
  scales = jnp.where(amax > 0, amax * np.float32(1 / maximum), 1.0)
  # x / (amax / MAX) may round a hair past MAX, where e4m3fn has no value (nor infinity).
  q_split = jnp.clip(x_split / scales, -maximum, maximum).astype(dtype)
  return _merge(q_split, x.shape, blocks), jnp.squeeze(scales, added)


def dequantize(q: jax.Array, scales: jax.Array, blocks: tuple, dtype=jnp.float32) -> jax.Array:
  """q · the scale of its block, in float32, then cast to `dtype`: -> q's shape."""
  q_split, _, added = _split(q.astype(jnp.float32), blocks)
  x_split = q_split * jnp.expand_dims(scales, added)
  return _merge(x_split, q.shape, blocks).astype(dtype)
