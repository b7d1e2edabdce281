"""Reading FLOPs, memory traffic and collectives out of compiled HLO, loops counted per trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import hlo_stats

M, K, N, TRIPS = 32, 48, 64, 5


def _chain(w_LxKxK, x_MxK, scan: bool):
  if scan:
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_MxK, w_LxKxK)[0]
  for w in w_LxKxK:
    x_MxK = jnp.tanh(x_MxK @ w)
  return x_MxK


def _compiled(scan: bool):
  args = (jnp.ones((TRIPS, K, K)), jnp.ones((M, K)))
  return jax.jit(lambda w, x: _chain(w, x, scan)).lower(*args).compile()


def test_a_scanned_matmul_counts_once_per_trip():
  scanned = hlo_stats.module_stats(_compiled(scan=True).as_text())
  assert scanned.dot_flops_once == 2 * M * K * K
  assert scanned.dot_flops == TRIPS * 2 * M * K * K


def test_loop_free_counts_equal_xla_cost_analysis():
  compiled = _compiled(scan=False)
  stats = hlo_stats.module_stats(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert stats.dot_flops == TRIPS * 2 * M * K * K
  assert stats.dot_flops == stats.dot_flops_once
  # XLA adds the tanh's elementwise FLOPs; the bytes are counted by the same rules.
  assert stats.dot_flops <= cost['flops'] <= 1.1 * stats.dot_flops
  assert stats.bytes_accessed == pytest.approx(cost['bytes accessed'], rel=0.02)


def test_scanned_and_unrolled_move_about_the_same_bytes():
  scanned = hlo_stats.module_stats(_compiled(scan=True).as_text())
  unrolled = hlo_stats.module_stats(_compiled(scan=False).as_text())
  assert scanned.bytes_accessed_once < unrolled.bytes_accessed
  assert scanned.bytes_accessed == pytest.approx(unrolled.bytes_accessed, rel=0.5)


@pytest.mark.parametrize('text, groups', [
    ('replica_groups={{0,1},{2,3}}, dimensions={0}', [[0, 1], [2, 3]]),
    ('replica_groups=[2,4]<=[8], to_apply=%add', [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ('replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add', [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use_global_device_ids=true",
     [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
])
def test_replica_groups_in_every_spelling(text, groups):
  assert hlo_stats.replica_groups(text) == groups


def test_bytes_one_device_sends_per_collective_kind():
  def sent(kind, result_bytes=800):
    return hlo_stats.Collective(kind, 'f32', result_bytes, [list(range(8))]).bytes_sent()
  assert sent('all-to-all') == 700  # its own eighth stays
  assert sent('all-gather') == 700  # the result is the gathered whole
  assert sent('reduce-scatter', 100) == 700  # the result is one shard of the 800 reduced
  assert sent('all-reduce') == 1400  # reduce-scatter then all-gather
  assert hlo_stats.Collective('all-to-all', 'f32', 800, [[0, 1]]).bytes_sent(0.5) == 200


def test_collectives_inside_a_loop_count_per_trip():
  mesh = jax.make_mesh((4,), ('x',), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  spec = jax.sharding.PartitionSpec('x')

  def body(x, _):
    return jax.lax.all_to_all(x, 'x', 0, 0, tiled=True) * 2, None

  def step(x_4NxD):
    return jax.lax.scan(body, x_4NxD, None, length=TRIPS)[0]
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct((4 * 16, 8), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, spec))
  stats = hlo_stats.module_stats(f.lower(x).compile().as_text())
  (collective, times), = [(c, t) for c, t in stats.collectives if c.kind == 'all-to-all']
  assert times == TRIPS and collective.group_size == 4
  assert times * collective.bytes_sent() == TRIPS * 16 * 8 * 4 * 3 / 4
  assert np.all([sorted(g) == g for g in collective.groups])
