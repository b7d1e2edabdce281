"""Grouped matmul (ragged dot): consecutive row groups of lhs times their group's matrix.

Shape suffixes: M rows, D contraction dim, F output dim, E groups (experts).

The kernel is picked by platform: on TPU the Pallas megablox `gmm` that ships with JAX
(`jax.experimental.pallas.ops.tpu.megablox`), on GPU tokamax's `ragged_dot` when tokamax is
installed (the optional extra `moetrain[kernels]`), and XLA's `jax.lax.ragged_dot` otherwise
(correct everywhere, but slow: see PERFORMANCE.md). Whatever the kernel, rows past
sum(group_sizes) belong to no group: they come out zero and get a zero gradient.
"""

import importlib.util
import sys

import jax
import jax.numpy as jnp
from absl import flags

KERNELS = ('xla', 'megablox', 'tokamax')
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
  return 'xla'


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


def ragged_dot(lhs_MxD: jax.Array, rhs_ExDxF: jax.Array, group_sizes_E: jax.Array, *,
               kernel: str | None = None, interpret: bool = False,
               tiling: tuple[int, int, int] | None = None) -> jax.Array:
  """Row group e of lhs (group_sizes_E[e] rows, in order) times rhs[e]: -> [M, F].

  `kernel`: one of KERNELS, default `default_kernel()`. `interpret` runs megablox in the Pallas
  interpreter (any platform: for tests); `tiling` overrides its `megablox_tiling`.
  """
  kernel = kernel or default_kernel()
  if kernel not in KERNELS:
    raise ValueError(f'grouped matmul kernel {kernel!r} is not one of {KERNELS}')
  group_sizes_E = group_sizes_E.astype(jnp.int32)
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
