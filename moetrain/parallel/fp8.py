"""Float8 tokens for the expert exchange (`model.moe.exchange_dtype=float8_e4m3fn`).

DeepSeek-V3's activation layout: every token row is cut into blocks of 128 channels of the model
dimension, each block scaled by its own float32 scale = amax / 448 (the largest e4m3fn value,
computed as amax · float32(1/448)) and cast to float8_e4m3fn. A model dimension that is not a
multiple of 128 ends in one shorter block, scaled over the channels it has (rather than refused:
small test models have them); a block of zeros gets scale 1, so it stays zero.

On the wire a row is its D fp8 values then its B float32 scales, as bytes (uint8 [D + 4·B]):
one collective per exchange, and one that every backend moves at one byte a value (XLA:CPU
widens float8 collective operands to f16, which would save nothing).

Shape suffixes: N rows (any leading axes), D model dim, B = ceil(D / 128) blocks of a row,
W = D + 4·B bytes of a row on the wire.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moetrain.errors import ConfigError

BLOCK = 128
DTYPE = jnp.float8_e4m3fn
MAX = float(jnp.finfo(DTYPE).max)  # 448


def num_blocks(d_model: int) -> int:
  """Scaling blocks of a row of `d_model` channels: B = ceil(D / 128)."""
  return -(-d_model // BLOCK)


def _blocks(x_NxD: jax.Array) -> jax.Array:
  """[..., D] float32 → [..., B, 128], the last block padded with zeros."""
  d_model = x_NxD.shape[-1]
  pad = num_blocks(d_model) * BLOCK - d_model
  padded = jnp.pad(x_NxD, [(0, 0)] * (x_NxD.ndim - 1) + [(0, pad)])
  return padded.reshape(*x_NxD.shape[:-1], -1, BLOCK)


def _unblock(x_NxBx128: jax.Array, d_model: int) -> jax.Array:
  return x_NxBx128.reshape(*x_NxBx128.shape[:-2], -1)[..., :d_model]


def quantize(x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """-> (q [..., D] float8_e4m3fn, scales [..., B] float32) with x ≈ q · scale of its block."""
  blocks_NxBx128 = _blocks(x_NxD.astype(jnp.float32))
  amax_NxB = jnp.max(jnp.abs(blocks_NxBx128), axis=-1)
  # amax / 448 as a product with float32(1 / 448): XLA:CPU rewrites the division into it, so
  # it is spelled out for every backend, and the numpy reference, to round the same way.
  scales_NxB = jnp.where(amax_NxB > 0, amax_NxB * np.float32(1 / MAX), 1.0)
  # x / (amax / 448) may round a hair past 448, where e4m3fn has no value (nor infinity).
  q_NxBx128 = jnp.clip(blocks_NxBx128 / scales_NxB[..., None], -MAX, MAX).astype(DTYPE)
  return _unblock(q_NxBx128, x_NxD.shape[-1]), scales_NxB


def dequantize(q_NxD: jax.Array, scales_NxB: jax.Array, dtype) -> jax.Array:
  """q · scale of its block, in float32, then cast to `dtype`: -> [..., D]."""
  x_NxBx128 = _blocks(q_NxD.astype(jnp.float32)) * scales_NxB[..., None]
  return _unblock(x_NxBx128, q_NxD.shape[-1]).astype(dtype)


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
