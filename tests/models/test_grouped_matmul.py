"""Grouped matmul kernels against jax.lax.ragged_dot and a per-group numpy reference."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import hlo_stats
from moetrain.models import grouped_matmul

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


def numpy_reference(lhs, rhs, cotangent, group_sizes=GROUP_SIZES):
  """Per-group products and their gradients: -> (out, d lhs, d rhs); rows of no group zero."""
  out, d_lhs, d_rhs = np.zeros(cotangent.shape), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for e, size in enumerate(group_sizes):
    rows = slice(start, start + size)
    out[rows] = lhs[rows] @ rhs[e]
    d_lhs[rows] = cotangent[rows] @ rhs[e].T
    d_rhs[e] = lhs[rows].T @ cotangent[rows]
    start += size
  return out, d_lhs, d_rhs


@functools.partial(jax.jit, static_argnames=('kernel', 'interpret', 'tiling', 'block_rows'))
def value_and_grads(lhs, rhs, cotangent, group_sizes=GROUP_SIZES, *, kernel, interpret=False,
                    tiling=None, block_rows=None):
  """-> (out, d lhs, d rhs) of `grouped_matmul.ragged_dot` under the given cotangent."""
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  fn = lambda l, r: grouped_matmul.ragged_dot(l, r, group_sizes, kernel=kernel,
                                              interpret=interpret, tiling=tiling,
                                              block_rows=block_rows)
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


# 1 row; 3, smaller than a group, whose blocks end mid-group; 4, a group's size; 16, more
# rows than every group and than M (clamped to M); None, `blockwise_rows`.
@pytest.mark.parametrize('block_rows', [1, 3, 4, 16, None])
def test_blockwise_matches_references(block_rows):
  check(value_and_grads(*make_inputs(), kernel='blockwise', block_rows=block_rows))


@pytest.mark.parametrize('group_sizes', [
    (0, 0, 40, 0),  # every row in one group
    tuple(np.random.default_rng(1).multinomial(29, np.ones(6) / 6)),  # 29 of 40 rows, random
])
# 3: the last block's window would run past lhs and starts early instead.
@pytest.mark.parametrize('block_rows', [3, 8, None])
def test_blockwise_matches_references_on_other_groupings(group_sizes, block_rows):
  rng = np.random.default_rng(2)
  lhs, rhs, cotangent = (rng.normal(size=shape).astype(np.float32)
                         for shape in ((40, 7), (len(group_sizes), 7, 3), (40, 3)))
  got = value_and_grads(lhs, rhs, cotangent, group_sizes, kernel='blockwise',
                        block_rows=block_rows)
  for want in (numpy_reference(lhs, rhs, cotangent, group_sizes),
               value_and_grads(lhs, rhs, cotangent, group_sizes, kernel='xla')):
    for got_i, want_i, name in zip(got, want, ('out', 'd lhs', 'd rhs')):
      np.testing.assert_allclose(got_i, want_i, rtol=RTOL, atol=ATOL, err_msg=name)
  assert np.all(np.asarray(got[0])[sum(group_sizes):] == 0.0)
  assert np.all(np.asarray(got[1])[sum(group_sizes):] == 0.0)


def test_blockwise_keeps_dtypes():
  lhs, rhs, cotangent = (jnp.asarray(a, jnp.bfloat16) for a in make_inputs())
  for got, want in zip(value_and_grads(lhs, rhs, cotangent, kernel='blockwise'),
                       value_and_grads(lhs, rhs, cotangent, kernel='xla')):
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2,
                               atol=2e-2)


def test_blockwise_in_shard_map_sums_replicated_weights_gradient():
  # Rows vary over the devices and rhs does not: the loops' carries and branches must still
  # agree on their types, and d rhs is the sum of the devices' own.
  mesh = jax.make_mesh((2,), ('x',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  (lhs_0, rhs, cotangent_0), (lhs_1, _, cotangent_1) = make_inputs(0), make_inputs(1)
  per_device = lambda l, r: grouped_matmul.ragged_dot(l, r, jnp.asarray(GROUP_SIZES),
                                                       kernel='blockwise')
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(jax.P('x'), jax.P()),
                     out_specs=jax.P('x'))
  out, vjp = jax.vjp(jax.jit(fn), np.concatenate([lhs_0, lhs_1]), rhs)
  d_lhs, d_rhs = vjp(np.concatenate([cotangent_0, cotangent_1]))
  want_0, want_1 = (numpy_reference(lhs, rhs, cotangent)
                    for lhs, cotangent in ((lhs_0, cotangent_0), (lhs_1, cotangent_1)))
  for got, want in ((out, np.concatenate([want_0[0], want_1[0]])),
                    (d_lhs, np.concatenate([want_0[1], want_1[1]])),
                    (d_rhs, want_0[2] + want_1[2])):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def compiled_cost(kernel, num_experts, rows=2048, width=64):
  """-> (dot FLOPs, temporary bytes) of one compiled forward and backward pass."""
  group_sizes = jnp.full((num_experts,), rows // num_experts, jnp.int32)
  def fn(lhs, rhs, cotangent):
    out, vjp = jax.vjp(lambda l, r: grouped_matmul.ragged_dot(l, r, group_sizes, kernel=kernel),
                       lhs, rhs)
    return out, vjp(cotangent)
  compiled = jax.jit(fn).lower(jnp.zeros((rows, width)), jnp.zeros((num_experts, width, width)),
                               jnp.zeros((rows, width))).compile()
  return (hlo_stats.module_stats(compiled.as_text()).dot_flops,
          compiled.memory_analysis().temp_size_in_bytes)


def test_blockwise_cost_grows_with_rows_not_groups():
  # On CPU XLA's ragged_dot multiplies every row by every group's matrix.
  flops, temp = zip(*(compiled_cost('blockwise', e) for e in (8, 64)))
  assert flops[1] < 1.5 * flops[0] and temp[1] < 2 * temp[0]
  # Forward and both gradients, over the blocks' rows (2048 + E·(b - 1) at most, b = 32, 8).
  for flops_e, rows in zip(flops, (2048 + 8 * 31, 2048 + 64 * 7)):
    assert 3 * 2 * 2048 * 64 * 64 <= flops_e <= 3 * 2 * rows * 64 * 64
  if jax.default_backend() == 'cpu':
    xla_flops, xla_temp = zip(*(compiled_cost('xla', e) for e in (8, 64)))
    assert xla_flops[1] > 6 * xla_flops[0] and xla_temp[1] > 6 * xla_temp[0]


def test_blockwise_rows_keeps_padding_small():
  assert grouped_matmul.blockwise_rows(32768, 64) == 64
  assert grouped_matmul.blockwise_rows(8192, 8) == 128
  assert grouped_matmul.blockwise_rows(2048, 64) == 8  # clamped
  assert grouped_matmul.blockwise_rows(10**6, 8) == 128  # clamped


def test_tokamax_matches_references():
  pytest.importorskip('tokamax', reason='tokamax is not installed (optional extra '
                      "'moetrain[kernels]')")
  # Off GPU and TPU, tokamax's ragged_dot runs its XLA reference implementation.
  check(value_and_grads(*make_inputs(), kernel='tokamax'))


def test_default_kernel_follows_the_platform():
  expected_kernel = {'tpu': 'megablox',
                     'gpu': 'tokamax' if importlib.util.find_spec('tokamax') else 'blockwise'}
  assert grouped_matmul.default_kernel() == expected_kernel.get(jax.default_backend(),
                                                                'blockwise')
  if jax.default_backend() == 'cpu':
    check(value_and_grads(*make_inputs(), kernel=None))


def test_megablox_tiling_fits_the_problem():
  assert grouped_matmul.megablox_tiling(13, 5, 6) == (16, 5, 6)
  assert grouped_matmul.megablox_tiling(4096, 2048, 1408) == (128, 128, 128)


def test_unknown_kernel_raises():
  lhs, rhs, _ = make_inputs()
  with pytest.raises(ValueError, match='bogus'):
    grouped_matmul.ragged_dot(lhs, rhs, jnp.asarray(GROUP_SIZES), kernel='bogus')
