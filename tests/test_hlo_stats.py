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


NODES = np.arange(8) // 4  # two nodes of four devices


@pytest.mark.parametrize('kind, groups, links', [
    ('all-to-all', [[0, 1, 2, 3], [4, 5, 6, 7]], {'intra': 600, 'inter': 0}),
    ('all-to-all', [[0, 4], [1, 5], [2, 6], [3, 7]], {'intra': 0, 'inter': 400}),
    ('all-to-all', [list(range(8))], {'intra': 300, 'inter': 400}),  # 3 peers near, 4 far
    ('all-gather', [[0, 1, 2, 3], [4, 5, 6, 7]], {'intra': 600, 'inter': 0}),
    # Rings: a channel per member of a node, each crossing between nodes once per node.
    ('all-gather', [list(range(8))], {'intra': 525, 'inter': 175}),
    ('reduce-scatter', [list(range(8))], {'intra': 4200, 'inter': 1400}),
    ('all-reduce', [[0, 4], [1, 5], [2, 6], [3, 7]], {'intra': 0, 'inter': 800}),
    ('all-gather', [[0, 1, 2, 4], [3, 5, 6, 7]], {'intra': 0, 'inter': 600}),  # one on a node
])
def test_collectives_split_their_bytes_by_link(kind, groups, links):
  collective = hlo_stats.Collective(kind, 'f32', 800, groups)
  assert collective.link_bytes(NODES) == links
  assert collective.nodes(NODES) == (1 if links['inter'] == 0 else 2)


def _all_to_all_hlo(mesh_shape, names, axis, **options):
  mesh = jax.make_mesh(mesh_shape, names, devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Explicit,) * len(names))
  spec = jax.sharding.PartitionSpec(names)
  f = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, axis, 0, 0, tiled=True, **options),
                            mesh=mesh, in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct((8 * 16, 4), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, spec))
  (collective, _), = hlo_stats.module_stats(f.lower(x).compile().as_text()).collectives
  return collective


@pytest.mark.parametrize('mesh_shape, names, axis, options, groups, links', [
    ((2, 4), ('node', 'local'), 'local', {}, [[0, 1, 2, 3], [4, 5, 6, 7]],
     {'intra': 192, 'inter': 0}),
    ((2, 4), ('node', 'local'), 'node', {}, [[0, 4], [1, 5], [2, 6], [3, 7]],
     {'intra': 0, 'inter': 128}),
    ((2, 4), ('node', 'local'), ('node', 'local'), {}, [list(range(8))],
     {'intra': 96, 'inter': 128}),
    ((8,), ('x',), 'x', {'axis_index_groups': [[0, 1, 2, 3], [4, 5, 6, 7]]},
     [[0, 1, 2, 3], [4, 5, 6, 7]], {'intra': 192, 'inter': 0}),
], ids=['inside-nodes', 'across-nodes', 'all', 'axis-index-groups'])
def test_a_compiled_all_to_all_names_its_devices_and_links(mesh_shape, names, axis, options,
                                                           groups, links):
  """Each device holds 16×4 float32 (256 bytes) and keeps its own share."""
  collective = _all_to_all_hlo(mesh_shape, names, axis, **options)
  assert collective.groups == groups and collective.devices == list(range(8))
  assert collective.op_name.endswith('shard_map/all_to_all')
  assert collective.result_bytes == 256
  assert collective.link_bytes(NODES) == links


def test_a_compiled_permute_names_its_source_target_pairs():
  mesh = jax.make_mesh((8,), ('x',), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.PartitionSpec('x')
  shift = [(i, (i + 4) % 8) for i in range(8)]  # to the same place on the other node
  f = jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, 'x', shift), mesh=mesh,
                            in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct((8 * 16, 4), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, spec))
  (collective, _), = hlo_stats.module_stats(f.lower(x).compile().as_text()).collectives
  assert collective.kind == 'collective-permute'
  assert sorted(map(tuple, collective.groups)) == shift
  assert collective.link_bytes(NODES) == {'intra': 0, 'inter': 256}
