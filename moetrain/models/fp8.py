"""FP8 matmuls (`model.fp8`): any bilinear product (einsum, matmul, batched expert matmul,
grouped matmul) computed on float8 operands with float32 accumulation.

Forward: y = f(Q(x), Q(w)) in float32, cast to x's dtype, Q a quantise-dequantise of
`moetrain.quantize` under the recipe (`quantize.RECIPES`): x in rows along the axes it is
contracted over, w in tiles over (contracted, output) axes with leading batch (expert) axes
kept. Backward: the product's own VJP at the quantised operands applied to Q(dy), dy in rows
along the output axes: dgrad and wgrad run on float8 values too. The gradients reach x and w
straight through the quantisation, each in its own dtype, so float32 master weights get float32
gradients. The saved residuals are the float8 operands and their scales, not the wide ones.

A weight can come quantised ahead (`Fp8Weight`, from an FSDP gather in FP8): the product then
uses that copy, and its gradient still goes to the master.

The dequantised operands are float32 (q · scale, one multiply each, right before the dot): on
every platform the same numbers up to float32 rounding, and for one scale per tensor the
pattern XLA's GPU GEMM rewriter turns into an FP8 cuBLAS GEMM (docs/fp8.md).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moetrain import quantize

NONE = 'none'
RECIPES = (NONE, *quantize.RECIPES)


class Fp8Weight(NamedTuple):
  """A weight with a float8 copy made ahead: q and scales in its [batch..., K, N] form."""
  master: jax.Array
  q: jax.Array
  scales: jax.Array


def _rows(recipe, x, axes: int, dtype):
  """x with its last `axes` axes flattened, quantised in rows: (q [..., K], scales)."""
  rows = x.reshape(*x.shape[:x.ndim - axes], -1)
  return quantize.quantize(rows, recipe.row_blocks(rows.ndim), dtype)


def _tiles(recipe, w, batch: int, contract: int):
  """w [batch..., K..., N...] as [batch..., K, N] tiles: (q, scales)."""
  matrices = w.reshape(*w.shape[:batch], math.prod(w.shape[batch:batch + contract]), -1)
  return quantize.quantize(matrices, recipe.tile_blocks(matrices.ndim), quantize.E4M3)


def _rows_back(recipe, q_and_scales, shape):
  q, scales = q_and_scales
  return quantize.dequantize(q, scales, recipe.row_blocks(q.ndim)).reshape(shape)


def _tiles_back(recipe, q_and_scales, shape):
  q, scales = q_and_scales
  return quantize.dequantize(q, scales, recipe.tile_blocks(q.ndim)).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _dot(fn, name, layout, meta, x, w, ahead, aux):
  return _dot_fwd(fn, name, layout, meta, x, w, ahead, aux)[0]


def _dot_fwd(fn, name, layout, meta, x, w, ahead, aux):
  recipe, (contract, batch), x_dtype = quantize.RECIPES[name], layout, meta[0]
  x_q = _rows(recipe, x, contract, quantize.E4M3)
  w_q = ahead if ahead is not None else _tiles(recipe, w, batch, contract)
  y = fn(_rows_back(recipe, x_q, x.shape), _tiles_back(recipe, w_q, w.shape), *aux)
  return y.astype(x_dtype), (x_q, w_q, aux)


def _dot_bwd(fn, name, layout, meta, residuals, dy):
  recipe, (contract, batch) = quantize.RECIPES[name], layout
  x_dtype, x_shape, w_dtype, w_shape = meta
  x_q, w_q, aux = residuals
  outputs = len(w_shape) - batch - contract
  dy_q = _rows(recipe, dy, outputs, recipe.gradient)
  _, vjp = jax.vjp(lambda a, b: fn(a, b, *aux), _rows_back(recipe, x_q, x_shape),
                   _tiles_back(recipe, w_q, w_shape))
  dx, dw = vjp(_rows_back(recipe, dy_q, dy.shape))
  return dx.astype(x_dtype), dw.astype(w_dtype), None, None


_dot.defvjp(_dot_fwd, _dot_bwd)


def dot(recipe: str, fn, x: jax.Array, w, *aux, contract: int = 1, batch: int = 0):
  """`fn(x, w, *aux)` on float8 operands under `recipe` (a key of `quantize.RECIPES`) -> in
  x's dtype.

  fn is bilinear in x and w and contracts x's last `contract` axes with w's axes after its
  `batch` leading ones (which pair with leading axes of x or, for a grouped matmul, with row
  groups); w's remaining axes are the output's last. `w` may be an `Fp8Weight`; `aux` are
  further arrays fn takes (group sizes), which get no gradient.
  """
  master, ahead = (w.master, (w.q, w.scales)) if isinstance(w, Fp8Weight) else (w, None)
  meta = (x.dtype, x.shape, master.dtype, master.shape)
  return _dot(fn, recipe, (contract, batch), meta, x, master, ahead, aux)


def matmul(recipe: str, fn=jnp.matmul, *aux):
  """`(x [..., K], w [batch..., K, N]) -> fn(x, w, *aux) [..., N]` under `recipe`: a dense
  matmul, experts batched over capacity buffers ([E, B, D]·[E, D, F]) or, with `fn` a grouped
  matmul and `aux` its group sizes, experts on sorted rows. 'none' gives fn itself."""
  if recipe == NONE:
    return (lambda x, w: fn(x, w, *aux)) if aux else fn
  return lambda x, w: dot(recipe, fn, x, w, *aux,
                          batch=(w.master if isinstance(w, Fp8Weight) else w).ndim - 2)


def weight(recipe: str, param, dtype) -> jax.Array:
  """The value a product takes of `param`: under a recipe the master itself (quantised from
  it, its gradient in its own dtype); 'none' casts it to the activation `dtype`."""
  return param[...] if recipe != NONE else param[...].astype(dtype)


def einsum(recipe: str, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, w)` of a projection, x's trailing axes contracted with w's leading
  ones, under `recipe` ('none': the einsum itself)."""
  if recipe == NONE:
    return jnp.einsum(spec, x, w)
  inputs, output = spec.split('->')
  lhs, rhs = inputs.split(',')
  contract = len(set(lhs) & set(rhs) - set(output))
  if lhs[len(lhs) - contract:] != rhs[:contract]:
    raise ValueError(f'{spec}: x must end and w begin with the contracted axes')
  return dot(recipe, functools.partial(jnp.einsum, spec), x, w, contract=contract)
