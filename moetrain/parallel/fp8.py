"""Float8 on the wire: tokens for the expert exchange (`model.moe.exchange_dtype=float8_e4m3fn`)
and expert weights gathered over FSDP under a `model.fp8` recipe (`gathered_weight`).

DeepSeek-V3's activation layout (`moetrain.quantize` with 1×128 blocks): every token row is cut
into blocks of 128 channels of the model dimension, each block scaled by its own float32 scale =
amax / 448 (the largest e4m3fn value, computed as amax · float32(1/448)) and cast to
float8_e4m3fn. A model dimension that is not a multiple of 128 ends in one shorter block, scaled
over the channels it has (rather than refused: small test models have them); a block of zeros
gets scale 1, so it stays zero.

On the wire a row is its D fp8 values then its B float32 scales, as bytes (uint8 [D + 4·B]):
one collective per exchange, and one that every backend moves at one byte a value (XLA:CPU
widens float8 collective operands to f16, which would save nothing).

Shape suffixes: N rows (any leading axes), D model dim, B = ceil(D / 128) blocks of a row,
W = D + 4·B bytes of a row on the wire.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import quantize as quantize_lib
from moetrain.errors import ConfigError

BLOCK = quantize_lib.BLOCK
DTYPE = quantize_lib.E4M3
MAX = quantize_lib.max_value(DTYPE)  # 448


def num_blocks(d_model: int) -> int:
  """Scaling blocks of a row of `d_model` channels: B = ceil(D / 128)."""
  return quantize_lib.num_blocks(d_model, BLOCK)


def quantize(x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """-> (q [..., D] float8_e4m3fn, scales [..., B] float32) with x ≈ q · scale of its block."""
  return quantize_lib.quantize(x_NxD, (BLOCK,), DTYPE)


def dequantize(q_NxD: jax.Array, scales_NxB: jax.Array, dtype) -> jax.Array:
  """q · scale of its block, in float32, then cast to `dtype`: -> [..., D]."""
  return quantize_lib.dequantize(q_NxD, scales_NxB, (BLOCK,), dtype)


def to_wire(x_NxD: jax.Array) -> jax.Array:
  """Quantised rows as bytes: -> uint8 [..., W], each row's fp8 values then its scales."""
  q_NxD, scales_NxB = quantize(x_NxD)
  scale_bytes_NxBx4 = jax.lax.bitcast_convert_type(scales_NxB, jnp.uint8)
  return jnp.concatenate([jax.lax.bitcast_convert_type(q_NxD, jnp.uint8),
                          scale_bytes_NxBx4.reshape(*scales_NxB.shape[:-1], -1)], axis=-1)


def from_wire(bytes_NxW: jax.Array, d_model: int, dtype) -> jax.Array:
  """The rows `to_wire` packed, dequantised to `dtype`: -> [..., D]. Rows of zero bytes (never
  written) come out zero."""
  q_NxD = jax.lax.bitcast_convert_type(bytes_NxW[..., :d_model], DTYPE)
  scale_bytes_NxBx4 = bytes_NxW[..., d_model:].reshape(*bytes_NxW.shape[:-1], -1, 4)
  return dequantize(q_NxD, jax.lax.bitcast_convert_type(scale_bytes_NxBx4, jnp.float32), dtype)


def gathered_weight(w_LxKxN: jax.Array, axis: int, recipe: str, axis_name: str = 'fsdp'):
  """The float8 copy of a weight block split along `axis` over `axis_name` (inside shard_map),
  quantised here as its part of the gathered block (`moetrain.quantize` under `recipe`: tiles,
  or one scale for the block, its amax a pmax over the shards) and gathered as bytes: -> (q,
  scales) equal to quantising the gathered block; None where there is nothing to gather, or
  where blockwise tiles would straddle the shards (the caller gathers the master instead)."""
  if jax.lax.axis_size(axis_name) == 1:
    return None
  block = quantize_lib.RECIPES[recipe].block
  if block and w_LxKxN.shape[axis] % block:
    return None
  reduce = None if block else (lambda amax: jax.lax.pmax(amax, axis_name))
  blocks = quantize_lib.RECIPES[recipe].tile_blocks(w_LxKxN.ndim)
  q, scales = quantize_lib.quantize(jax.lax.stop_gradient(w_LxKxN), blocks, DTYPE, reduce)
  gather = lambda a: jax.lax.all_gather(a, axis_name, axis=axis, tiled=True)
  q_bytes = gather(jax.lax.bitcast_convert_type(q, jnp.uint8))
  return (jax.lax.bitcast_convert_type(q_bytes, DTYPE), gather(scales) if block else scales)


def check(exchange_dtype: str, devices) -> None:
  """ConfigError unless `devices` quantise tokens to `exchange_dtype` correctly ('' needs
  nothing): a round trip of a few exactly representable values on one of this process's."""
  if not exchange_dtype:
    return
  device = next(d for d in devices if d.process_index == jax.process_index())
  field = f'model.moe.exchange_dtype={exchange_dtype}: the {device.platform} backend'
  probe_1xD = np.array([[MAX, -1.5, 0.25, 0.0]], np.float32)
  round_trip = jax.jit(lambda x: from_wire(to_wire(x), probe_1xD.shape[1], jnp.float32))
  try:
    result_1xD = np.asarray(round_trip(jax.device_put(probe_1xD, device)))
  except (jax.errors.JaxRuntimeError, NotImplementedError) as error:
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    raise ConfigError(f'{field} cannot quantise tokens to it ({reason})') from error
  if not np.array_equal(result_1xD, probe_1xD):
    raise ConfigError(f'{field} quantises tokens to it wrongly ({probe_1xD[0]} came back as '
                      f'{result_1xD[0]})')
