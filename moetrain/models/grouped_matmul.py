"""Grouped matmul (ragged dot): consecutive row groups of lhs times their group's matrix.

Shape suffixes: M rows, D contraction dim, F output dim, E groups (experts).

The kernel is picked by platform: on TPU the Pallas megablox `gmm` that ships with JAX
(`jax.experimental.pallas.ops.tpu.megablox`), on GPU tokamax's `ragged_dot` when tokamax is
installed (the optional extra `moetrain[kernels]`), and 'blockwise' otherwise: a loop over
blocks of b rows of one group each, in plain XLA. XLA's own `jax.lax.ragged_dot` ('xla') is
computed densely over every group wherever no grouped-matmul kernel is registered (CPU, GPU
without tokamax): E times the FLOPs. Whatever the kernel, rows past sum(group_sizes) belong to
no group: they come out zero and get a zero gradient.
"""

import functools
import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
from absl import flags

from moetrain.jax_compat import varying_axes

KERNELS = ('xla', 'megablox', 'tokamax', 'blockwise')
# megablox's default (m, k, n) tile sizes. On TPU a tile's k and n must be multiples of 128 or
# the whole dimension, and m a multiple of 16 (bf16 packs two rows per sublane).
MEGABLOX_TILING = (128, 128, 128)


def default_kernel() -> str:
  """The grouped matmul kernel for the default JAX backend: one of KERNELS."""
  platform = jax.default_backend()
  if platform == 'tpu':
    return 'megablox'
  # Only looked up, not imported: importing tokamax takes most of a second.
  if platform == 'gpu' and importlib.util.find_spec('tokamax') is not None:
    return 'tokamax'
  # On a shared 2-core CPU (jax 0.10.2, float32, forward and backward) 'blockwise' took 62 ms
  # against jax.lax.ragged_dot's 4.8 s for M=32768, D=256, F=64, E=64, and 66 ms against 550
  # ms for M=8192, D=256, F=512, E=8: level with a batched einsum over [E, 1.25·M/E, D]
  # capacity buffers (81 and 63 ms). On GPU without tokamax the choice rests on the project's
  # reference: jax.lax.ragged_dot on an H100 ran at 9-99 TFLOP/s, 6-73x slower than a dense
  # matmul of equal FLOPs, computed densely over all groups; 'blockwise' is unmeasured there.
  return 'blockwise'


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """MEGABLOX_TILING fitted to the problem: a k or n tile no larger than its dimension, and
  an m tile no larger than m rounded up to 16 (lhs is padded to a multiple of it)."""
  tm, tk, tn = MEGABLOX_TILING
  return min(tm, -(-m // 16) * 16), min(tk, k), min(tn, n)


def _megablox(lhs_MxD, rhs_ExDxF, group_sizes_E, tiling, interpret):
  # Imported here: the Pallas TPU modules are not needed on other platforms.
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=g-import-not-at-top
  rows, d = lhs_MxD.shape
  tiling = tiling or megablox_tiling(rows, d, rhs_ExDxF.shape[-1])
  # gmm needs M to be a multiple of the m tile; the padding rows belong to no group.
  lhs_PxD = jnp.pad(lhs_MxD, ((0, -rows % tiling[0]), (0, 0)))
  out_PxF = megablox.gmm(lhs_PxD, rhs_ExDxF, group_sizes_E,
                         preferred_element_type=jnp.result_type(lhs_MxD, rhs_ExDxF),
                         tiling=tuple(tiling), interpret=interpret)
  return out_PxF[:rows]


def _tokamax(lhs_MxD, rhs_ExDxF, group_sizes_E):
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("kernel='tokamax' needs tokamax: pip install 'moetrain[kernels]'") \
        from error
  # tokamax 0.0.12 hands all of sys.argv to absl on first use, which fails on flags absl does
  # not know or reads differently (argparse command lines; pytest's -v is absl's verbosity):
  # give absl only tokamax's own flags (upstream: openxla/tokamax#957).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1] + [a for a in sys.argv[1:] if a.startswith('--tokamax_')],
                known_only=True)
  return tokamax.ragged_dot(lhs_MxD, rhs_ExDxF, group_sizes_E)


def blockwise_rows(rows: int, groups: int) -> int:
  """The 'blockwise' kernel's default block size b for M rows in E groups: the power of two
  nearest M/(8·E), clamped to [8, 128]."""
  # Padding wastes E·b/2 rows on average (M/16 here), and smaller blocks pay more per-block
  # costs (loop steps, window slices and merges). On a 2-core CPU, forward and backward, M/(8·E)
  # was the best or level with it: M=32768, E=64, D=256, F=64, b = 32, 64, 128: 66, 62, 80 ms;
  # M=8192, E=8, D=256, F=512, b = 64, 128, 256: 75, 66, 65 ms.
  return min(128, max(8, 2 ** round(math.log2(max(rows / (8 * groups), 1)))))


def _block_layout(group_sizes_E, rows, block_rows):
  """Each group's rows cut into blocks of b, group by group: -> (group_NB, window_NB, lo_NB,
  hi_NB), each block's group, the first row of the b-row window of lhs it covers, and the
  window's rows [lo, hi) that are its own (none for the blocks past the used ones)."""
  num_groups, b = group_sizes_E.shape[0], block_rows
  num_blocks = (rows + num_groups * (b - 1)) // b  # >= sum of ceil(size / b)
  ends_E = jnp.cumsum(group_sizes_E)
  blocks_E = -(-group_sizes_E // b)
  block_starts_E = jnp.cumsum(blocks_E) - blocks_E
  blocks_NB = jnp.arange(num_blocks)
  group_NB = jnp.minimum(jnp.searchsorted(block_starts_E + blocks_E, blocks_NB, side='right'),
                         num_groups - 1)
  # Blocks past the used ones start at or past the last group's end: they own no row.
  first_NB = ends_E[group_NB] - group_sizes_E[group_NB] + (
      blocks_NB - block_starts_E[group_NB]) * b
  last_NB = jnp.minimum(first_NB + b, ends_E[group_NB])
  # Windows are slices of lhs itself, not of a padded copy: one that would run past the end
  # starts early instead, its first rows another block's.
  window_NB = jnp.clip(first_NB, 0, rows - b)
  return group_NB, window_NB, first_NB - window_NB, last_NB - window_NB


def _vary_alike(*arrays):
  """arrays, each typed (in shard_map) as varying over every mesh axis any of them varies
  over, so that the loops' carries and branches built from them agree on it."""
  varying = [varying_axes(a) for a in arrays]
  axes = frozenset().union(*varying)
  return [jax.lax.pcast(a, tuple(sorted(axes - v)), to='varying') if axes - v else a
          for a, v in zip(arrays, varying)]


def _row(array, index):
  return jax.lax.dynamic_index_in_dim(array, index, keepdims=False)


def _own_bx1(lo, hi, b):
  rows_b = jnp.arange(b)
  return ((lo <= rows_b) & (rows_b < hi))[:, None]


def _blockwise_fwd(lhs_MxD, rhs_ExDxF, group_sizes_E, block_rows):
  rows, b = lhs_MxD.shape[0], block_rows
  layout = _block_layout(group_sizes_E, rows, b)
  dtype = jnp.result_type(lhs_MxD, rhs_ExDxF)

  def block(carry, args):
    out_MxF, w_DxF, prev = carry
    g, window, lo, hi = args
    # Blocks come group by group: a group's matrix is sliced out once, not once per block.
    w_DxF = jax.lax.cond(g != prev, lambda: _row(rhs_ExDxF, g), lambda: w_DxF)
    x_bxD = jax.lax.dynamic_slice_in_dim(lhs_MxD, window, b)
    matmul = lambda: jnp.dot(x_bxD, w_DxF, preferred_element_type=jnp.float32).astype(dtype)
    # Blocks past the used ones skip the matmul. It is the conditional's first branch (false),
    # the one `hlo_stats` counts.
    y_bxF = jax.lax.cond(hi <= lo, lambda: jnp.zeros_like(x_bxD, dtype, (b, w_DxF.shape[1])),
                         matmul)
    # The window's other rows are other blocks' (or no group's): keep what is there.
    y_bxF = jnp.where(_own_bx1(lo, hi, b), y_bxF,
                      jax.lax.dynamic_slice_in_dim(out_MxF, window, b))
    return (jax.lax.dynamic_update_slice_in_dim(out_MxF, y_bxF, window, 0), w_DxF, g), None
  init = (jnp.zeros_like(lhs_MxD, dtype, (rows, rhs_ExDxF.shape[2])),
          _row(rhs_ExDxF, layout[0][0]), layout[0][0])
  (out_MxF, _, _), _ = jax.lax.scan(block, init, layout)
  return out_MxF, (lhs_MxD, rhs_ExDxF, layout)


def _blockwise_bwd(block_rows, residuals, dout_MxF):
  lhs_MxD, rhs_ExDxF, layout = residuals
  b = block_rows

  def block(carry, args):
    d_lhs_MxD, d_rhs_ExDxF, w_DxF, dw_DxF, prev = carry
    g, window, lo, hi = args
    # A group's first block files the previous group's d rhs (summed in float32 over its
    # blocks) and slices out this group's matrix.
    next_group = lambda: (jax.lax.dynamic_update_index_in_dim(d_rhs_ExDxF, dw_DxF, prev, 0),
                          _row(rhs_ExDxF, g), jnp.zeros_like(dw_DxF))
    d_rhs_ExDxF, w_DxF, dw_DxF = jax.lax.cond(g != prev, next_group,
                                              lambda: (d_rhs_ExDxF, w_DxF, dw_DxF))
    own_bx1 = _own_bx1(lo, hi, b)
    x_bxD = jax.lax.dynamic_slice_in_dim(lhs_MxD, window, b)
    dout_bxF = jnp.where(own_bx1, jax.lax.dynamic_slice_in_dim(dout_MxF, window, b), 0)

    def matmuls():
      dx_bxD = jax.lax.dot_general(dout_bxF, w_DxF, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
      return dx_bxD.astype(lhs_MxD.dtype), jnp.dot(x_bxD.T, dout_bxF,
                                                   preferred_element_type=jnp.float32)
    dx_bxD, dw_block_DxF = jax.lax.cond(hi <= lo, lambda: (
        jnp.zeros_like(x_bxD), jnp.zeros_like(dw_DxF)), matmuls)
    dx_bxD = jnp.where(own_bx1, dx_bxD, jax.lax.dynamic_slice_in_dim(d_lhs_MxD, window, b))
    return (jax.lax.dynamic_update_slice_in_dim(d_lhs_MxD, dx_bxD, window, 0), d_rhs_ExDxF,
            w_DxF, dw_DxF + dw_block_DxF, g), None
  g = layout[0][0]
  init = (jnp.zeros_like(lhs_MxD), jnp.zeros_like(rhs_ExDxF, jnp.float32), _row(rhs_ExDxF, g),
          jnp.zeros_like(rhs_ExDxF, jnp.float32, rhs_ExDxF.shape[1:]), g)
  (d_lhs_MxD, d_rhs_ExDxF, _, dw_DxF, g), _ = jax.lax.scan(block, init, layout)
  d_rhs_ExDxF = jax.lax.dynamic_update_index_in_dim(d_rhs_ExDxF, dw_DxF, g, 0)
  return d_lhs_MxD, d_rhs_ExDxF.astype(rhs_ExDxF.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(lhs_MxD, rhs_ExDxF, group_sizes_E, block_rows):
  """lhs's rows block by block (b rows of one group each) times their group's matrix: -> [M, F]
  in O((M + E·b)·D·F) FLOPs and no buffer larger than the inputs and outputs."""
  return _blockwise_fwd(lhs_MxD, rhs_ExDxF, group_sizes_E, block_rows)[0]


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def ragged_dot(lhs_MxD: jax.Array, rhs_ExDxF: jax.Array, group_sizes_E: jax.Array, *,
               kernel: str | None = None, interpret: bool = False,
               tiling: tuple[int, int, int] | None = None,
               block_rows: int | None = None) -> jax.Array:
  """Row group e of lhs (group_sizes_E[e] rows, in order) times rhs[e]: -> [M, F].

  `kernel`: one of KERNELS, default `default_kernel()`. `interpret` runs megablox in the Pallas
  interpreter (any platform: for tests); `tiling` overrides its `megablox_tiling`, and
  `block_rows` the 'blockwise' kernel's `blockwise_rows` (at most M).
  """
  kernel = kernel or default_kernel()
  if kernel not in KERNELS:
    raise ValueError(f'grouped matmul kernel {kernel!r} is not one of {KERNELS}')
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if kernel == 'blockwise':
    # Rows of no group are in no block: zero, with a zero gradient, without the selects below.
    rows = lhs_MxD.shape[0]
    block_rows = min(block_rows or blockwise_rows(rows, rhs_ExDxF.shape[0]), rows)
    # Outside the custom VJP, so that autodiff sums rhs's gradient over the axes it gains.
    return _blockwise(*_vary_alike(lhs_MxD, rhs_ExDxF, group_sizes_E), block_rows)
  # Kernels leave whatever they like in the rows of no group, in the output and in the lhs
  # gradient (megablox: uninitialised memory); the selects make both exactly zero.
  valid_Mx1 = (jnp.arange(lhs_MxD.shape[0]) < jnp.sum(group_sizes_E))[:, None]
  lhs_MxD = jnp.where(valid_Mx1, lhs_MxD, 0)
  if kernel == 'megablox':
    out_MxF = _megablox(lhs_MxD, rhs_ExDxF, group_sizes_E, tiling, interpret)
  elif kernel == 'tokamax':
    out_MxF = _tokamax(lhs_MxD, rhs_ExDxF, group_sizes_E)
  else:
    out_MxF = jax.lax.ragged_dot(lhs_MxD, rhs_ExDxF, group_sizes_E)
  return jnp.where(valid_Mx1, out_MxF, 0)
