"""Grouped matmul kernels against jax.lax.ragged_dot and a per-group numpy reference."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.models import dropless, grouped_matmul

RTOL, ATOL = 1e-5, 1e-5
# M = 13 rows in E = 5 groups: the first, a middle and the last group empty, and rows 10..12
# past sum(group_sizes), in no group. D = 5 and F = 6 are not multiples of the tiles below.
GROUP_SIZES = (0, 4, 0, 6, 0)
M, D, F = 13, 5, 6


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  lhs = rng.normal(size=(M, D)).astype(np.float32)
  rhs = rng.normal(size=(len(GROUP_SIZES), D, F)).astype(np.float32)
  cotangent = rng.normal(size=(M, F)).astype(np.float32)
  return lhs, rhs, cotangent


def numpy_reference(lhs, rhs, cotangent):
  """Per-group products and their gradients: -> (out, d lhs, d rhs); rows of no group zero."""
  out, d_lhs, d_rhs = np.zeros((M, F)), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for e, size in enumerate(GROUP_SIZES):
    rows = slice(start, start + size)
    out[rows] = lhs[rows] @ rhs[e]
    d_lhs[rows] = cotangent[rows] @ rhs[e].T
    d_rhs[e] = lhs[rows].T @ cotangent[rows]
    start += size
  return out, d_lhs, d_rhs


@functools.partial(jax.jit, static_argnames=('kernel', 'interpret', 'tiling'))
def value_and_grads(lhs, rhs, cotangent, *, kernel, interpret=False, tiling=None):
  """-> (out, d lhs, d rhs) of `grouped_matmul.ragged_dot` under the given cotangent."""
  group_sizes = jnp.asarray(GROUP_SIZES, jnp.int32)
  fn = lambda l, r: grouped_matmul.ragged_dot(l, r, group_sizes, kernel=kernel,
                                              interpret=interpret, tiling=tiling)
  out, vjp = jax.vjp(fn, lhs, rhs)
  return (out, *vjp(cotangent))


@functools.lru_cache(maxsize=None)
def expected():
  """Both references, which must agree: -> (numpy reference, jax.lax.ragged_dot results)."""
  lhs, rhs, cotangent = make_inputs()
  group_sizes = jnp.asarray(GROUP_SIZES, jnp.int32)
  out, vjp = jax.vjp(lambda l, r: jax.lax.ragged_dot(l, r, group_sizes), lhs, rhs)
  lax_results = (out, *vjp(cotangent))
  reference = numpy_reference(lhs, rhs, cotangent)
  for got, want in zip(lax_results, reference):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  return reference


def check(results):
  for got, want, name in zip(results, expected(), ('out', 'd lhs', 'd rhs')):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
  # Rows of no group: exactly zero in the output and in the lhs gradient.
  past = sum(GROUP_SIZES)
  assert np.all(np.asarray(results[0])[past:] == 0.0)
  assert np.all(np.asarray(results[1])[past:] == 0.0)


# (8, 2, 4): two m tiles (M padded to 16) with groups straddling them, and k and n tiles that
# leave a remainder. None: `megablox_tiling`, one tile per dimension.
@pytest.mark.parametrize('tiling', [(8, 2, 4), None])
def test_megablox_in_interpret_mode_matches_references(tiling):
  # The Pallas TPU kernel in the Pallas interpreter, on any platform. Uninitialised output
  # rows read NaN there, so this also checks that rows of no group are masked.
  check(value_and_grads(*make_inputs(), kernel='megablox', interpret=True, tiling=tiling))


def test_xla_kernel_matches_references():
  check(value_and_grads(*make_inputs(), kernel='xla'))


def test_tokamax_matches_references():
  pytest.importorskip('tokamax', reason='tokamax is not installed (optional extra '
                      "'moetrain[kernels]')")
  # Off GPU and TPU, tokamax's ragged_dot runs its XLA reference implementation.
  check(value_and_grads(*make_inputs(), kernel='tokamax'))


def test_default_kernel_follows_the_platform():
  expected_kernel = {'tpu': 'megablox',
                     'gpu': 'tokamax' if importlib.util.find_spec('tokamax') else 'xla'}
  assert grouped_matmul.default_kernel() == expected_kernel.get(jax.default_backend(), 'xla')
  if jax.default_backend() == 'cpu':
    lhs, rhs, _ = make_inputs()
    group_sizes = jnp.asarray(GROUP_SIZES, jnp.int32)
    np.testing.assert_allclose(dropless.ragged_dot(lhs, rhs, group_sizes), expected()[0],
                               rtol=RTOL, atol=ATOL)


def test_megablox_tiling_fits_the_problem():
  assert grouped_matmul.megablox_tiling(13, 5, 6) == (16, 5, 6)
  assert grouped_matmul.megablox_tiling(4096, 2048, 1408) == (128, 128, 128)


def test_unknown_kernel_raises():
  lhs, rhs, _ = make_inputs()
  with pytest.raises(ValueError, match='bogus'):
    grouped_matmul.ragged_dot(lhs, rhs, jnp.asarray(GROUP_SIZES), kernel='bogus')
