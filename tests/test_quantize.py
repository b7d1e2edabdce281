"""The float8 block quantiser (`moetrain.quantize`) against a numpy reference, bit for bit: one
scale per tensor and per matrix, 1×128 rows and 128×128 tiles, partial blocks at every edge."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moetrain import quantize

FLOAT8 = {'e4m3': (ml_dtypes.float8_e4m3fn, 448.0), 'e5m2': (ml_dtypes.float8_e5m2, 57344.0)}


def reference_quantize(x, rows, cols, float8='e4m3'):
  """numpy, block by block: x [..., K, N] (a vector is one row) in blocks of rows × cols values
  (the last of an axis shorter where it does not divide), scale = amax · float32(1 / MAX) (1
  for a zero block), q = x / scale clipped to ±MAX. -> (q, scales [..., ceil(K/rows),
  ceil(N/cols)])."""
  dtype, maximum = FLOAT8[float8]
  x = np.asarray(x, np.float32)
  matrices = x.reshape(-1, *x.shape[-2:]) if x.ndim > 1 else x.reshape(1, 1, -1)
  k, n = matrices.shape[1:]
  q = np.zeros(matrices.shape, dtype)
  scales = np.zeros((len(matrices), -(-k // rows), -(-n // cols)), np.float32)
  for m, matrix in enumerate(matrices):
    for i in range(0, k, rows):
      for j in range(0, n, cols):
        block = matrix[i:i + rows, j:j + cols]
        amax = np.abs(block).max()
        scale = amax * np.float32(1 / maximum) if amax > 0 else np.float32(1)
        q[m, i:i + rows, j:j + cols] = np.clip(block / scale, -maximum, maximum).astype(dtype)
        scales[m, i // rows, j // cols] = scale
  lead = x.shape[:-2] if x.ndim > 1 else ()
  return q.reshape(x.shape), scales.reshape(*lead, *scales.shape[1:])


def reference_dequantize(q, scales, rows, cols):
  """numpy: q · the scale of its block, float32."""
  x = q.astype(np.float32)
  rows_of = np.repeat(scales, rows, axis=-2)[..., :x.shape[-2], :]
  return x * np.repeat(rows_of, cols, axis=-1)[..., :x.shape[-1]]


def values(shape, seed=0):
  """Normal values with magnitudes spread over rows and columns, an all-zero 128×128 block and
  outliers in another."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 10.0 ** rng.integers(-5, 4, shape[:-1] + (1,))
  x = x * 10.0 ** rng.integers(-2, 3, shape[-1])
  x[..., :128, :128] = 0
  x[..., -1, -1] = 1e6
  return x.astype(np.float32)


# (shape, blocks, the reference's block rows and columns, float8 type)
CASES = {
    'rows': ((3, 300), (128,), 1, 128, 'e4m3'),  # 1×128, the last block 44 wide
    'tiles': ((200, 260), (128, 128), 128, 128, 'e4m3'),  # partial tiles at both edges
    'tiles of a stack': ((2, 200, 260), (128, 128), 128, 128, 'e4m3'),
    'one per matrix': ((2, 200, 260), (0, 0), 200, 260, 'e4m3'),
    'one per tensor, e5m2': ((3, 300), (0, 0), 3, 300, 'e5m2'),
}


@pytest.mark.parametrize('case', CASES)
def test_quantisation_equals_numpy_reference_bit_for_bit(case):
  shape, blocks, rows, cols, float8 = CASES[case]
  x = values(shape)
  if case == 'rows':
    x[1, :] = 0  # a zero row: every block's scale 1
  ref_q, ref_scales = reference_quantize(x, rows, cols, float8)
  dtype = jnp.dtype(FLOAT8[float8][0])

  def round_trip(x):
    q, scales = quantize.quantize(x, blocks, dtype)
    return q, scales, quantize.dequantize(q, scales, blocks)
  q, scales, back = jax.jit(round_trip)(x)
  assert q.dtype == dtype and scales.dtype == jnp.float32
  assert scales.shape == quantize.scale_shape(shape, blocks) == ref_scales.shape
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  np.testing.assert_array_equal(np.asarray(back), reference_dequantize(ref_q, ref_scales, rows,
                                                                      cols))
  assert np.abs(ref_q.astype(np.float32)).max() == FLOAT8[float8][1]  # the range is used
  if blocks == (128, 128):
    assert (ref_scales[..., 0, 0] == 1).all()  # the zero block
