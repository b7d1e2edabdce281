"""The compiled-step cost model against hand counts: FLOPs, all-to-all volume, memory per device.

The bench configs shrunk to CPU size keep their structure (E8 top-2; E64 top-8 with a shared
expert; bf16; scanned layers, so the loop-trip corrections are exercised).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import cost_model, exchange_model, hardware, hlo_stats
from moetrain.parallel.mesh import make_mesh

SMALL = ['--config.model.d_model=256', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=4', '--config.model.num_layers=3',
         '--config.model.vocab_size=512', '--config.model.max_seq_len=128',
         '--config.train.seq_len=128', '--config.train.batch_size=16']
BENCH = {
    'e8k2': ('configs/bench_e8k2.py', ['--config.model.moe.d_expert=256']),
    'e64k8': ('configs/bench_e64k8.py', ['--config.model.moe.d_expert=64',
                                         '--config.model.moe.d_shared_expert=64']),
}


def small_config(name, *overrides):
  path, shape = BENCH[name]
  return config_lib.load(path, SMALL + shape + list(overrides))


@functools.lru_cache(maxsize=None)
def cost(name, devices, *overrides):
  return cost_model.step_cost(small_config(name, *overrides), jax.devices()[:devices])


@pytest.mark.parametrize('name', sorted(BENCH))
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_flops_equal_the_hand_count_of_hardware_flops(name, remat):
  """6·N_active·tokens plus attention, routed experts on every capacity slot, the forward
  pass twice when rematerialised; XLA's count corrected for the scanned layers."""
  step = cost(name, 1, f'--config.train.remat={remat}')
  hand = cost_model.hand_flops(small_config(name, f'--config.train.remat={remat}'))
  assert step.xla_flops < 0.6 * hand['hardware']  # one layer of three, before the correction
  assert cost_model.flops_ratio(step, hand) == pytest.approx(1.0, abs=0.05)


def test_hand_count_includes_the_prediction_modules_moe_block():
  """A multi-token-prediction module's MoE block computes its capacity slots like any MoE
  layer's (capacity factor 2: twice its k choices, which the count must not take instead)."""
  overrides = ('--config.model.mtp_layers=1', '--config.model.moe.capacity_factor=2.0')
  hand = cost_model.hand_flops(small_config('e8k2', *overrides))
  assert cost_model.flops_ratio(cost('e8k2', 1, *overrides), hand) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize('name, mesh', [('e8k2', 'expert=8'), ('e64k8', 'expert=8'),
                                        ('e64k8', 'expert=4 data=2')])
def test_all_to_all_bytes_equal_the_analytic_volume(name, mesh):
  axes = dict(item.split('=') for item in mesh.split())
  overrides = tuple(f'--config.mesh.{axis}={axes.get(axis, 1)}'
                    for axis in ('data', 'fsdp', 'expert', 'tensor'))
  step = cost(name, 8, *overrides)
  analytic = exchange_model.all_to_all_bytes(small_config(name, *overrides),
                                         expert_parallel=int(axes['expert']), batch_shards=8)
  assert step.collective_groups['all-to-all'] == int(axes['expert'])
  assert step.collective_bytes['all-to-all'] == pytest.approx(analytic, rel=0.10)
  # The MoE layers' own all-to-alls (GSPMD adds small ones elsewhere), on one node of 8.
  exchange = step.link_bytes[8]['exchange']
  assert exchange['inter'] == 0 and exchange['intra'] == pytest.approx(analytic, rel=0.10)
  assert step.exchange.mesh['expert'] == int(axes['expert'])


def test_memory_per_device_shrinks_with_fsdp_and_expert_sharding():
  alone = cost('e64k8', 1)
  fsdp = cost('e64k8', 8, '--config.mesh.data=1', '--config.mesh.fsdp=8')
  expert = cost('e64k8', 8, '--config.mesh.data=1', '--config.mesh.expert=8')
  # The state (params and optimizer moments) is the step's argument: each device holds 1/8 of
  # it, split along embed by FSDP, by expert and along embed by expert parallelism.
  for sharded in (fsdp, expert):
    assert sharded.xla_memory['argument'] == pytest.approx(alone.xla_memory['argument'] / 8,
                                                           rel=0.05)
  for sharded in (fsdp, expert):
    assert sharded.xla_memory['peak'] < alone.xla_memory['peak'] / 2
    assert sharded.estimated_memory['total'] < alone.estimated_memory['total'] / 2


def _step(flops, link_bytes, exchange=None, memory=None):
  memory = memory or {'params': 0.0, 'optimizer': 0.0, 'activations': 0.0, 'total': 0.0}
  return cost_model.StepCost(
      devices=8, mesh={}, tokens=1000, compile_seconds=0.0, xla_flops=0.0, flops=flops,
      xla_bytes_accessed=0.0, bytes_accessed=0.0, collective_bytes={}, collective_groups={},
      link_bytes=link_bytes, exchange=exchange, xla_memory={}, estimated_memory=memory)


def test_roofline_of_a_compute_bound_step():
  chip = hardware.CHIPS['h100']
  sent = chip.link_bandwidth / 4
  step = _step(chip.peak_flops, {8: {'all-gather': {'intra': sent, 'inter': 0.0}}},
               memory={'params': 1e9, 'optimizer': 2e9, 'activations': 1e9, 'total': 4e9})
  row = cost_model.roofline(step, model_flops=4 * chip.peak_flops, chip=chip)
  assert row['compute_s'] == 1.0 and row['collective_s'] == {'all-gather': 0.25}
  assert row['memory_s'] == pytest.approx(12e9 / chip.hbm_bandwidth)
  assert row['step_s'] == 1.25 and row['overlapped_step_s'] == 1.0
  assert row['exposed_comm_s'] == 0.25 and row['exchange'] is None
  assert row['mfu'] == pytest.approx(4 / (8 * 1.25))
  assert row['fits']
  step.link_bytes[8]['all-gather'] = {'intra': 0.0, 'inter': sent}  # across nodes: the network
  assert cost_model.roofline(step, 1.0, chip)['collective_s']['all-gather'] == pytest.approx(
      chip.link_bandwidth / 4 / chip.network_bandwidth)


@pytest.mark.parametrize('dispatch, compute, combine, chunks, latency, seconds', [
    (1, 4, 1, 1, 0, 6),  # one chunk: nothing overlaps
    (1, 4, 1, 4, 0, 4.5),  # the experts cover all but one chunk's way in and out
    (2, 1, 2, 4, 0, 4),  # the link is busy throughout
    (0.5, 4, 1, 4, 0, 4.375),  # FP8 dispatch: the first (short) dispatch and the last combine
    (1, 4, 1, 4, 0.1, 4.7),  # every chunk's exchanges pay the latency
])
def test_chunk_pipeline_by_hand(dispatch, compute, combine, chunks, latency, seconds):
  assert exchange_model.chunk_pipeline(dispatch, compute, combine, chunks, latency) == (
      pytest.approx(seconds))


@pytest.mark.parametrize('dispatch, compute, combine, before, after, seconds', [
    # Chunks of the whole block, 2 chunks: attention 1 s each, dispatch 0.5 s, experts 2 s.
    # Chip: A1 0–1, A2 1–2, E1 2–4, E2 4–6;
    # link: D1 1–1.5, D2 2–2.5, C1 4–4.5, C2 6–6.5.
    (1, 4, 1, 2, 0, 6.5),  # only the last combine shows: the experts-only chunks show 1 s
    # Backward: C'1 0–0.5 on the link, then E'1 0.5–4.5, E'2 4.5–8.5, A'1 8.5–10.5,
    # A'2 10.5–12.5.
    (1, 8, 1, 0, 4, 12.5),  # only the first way in shows
    (4, 1, 4, 2, 0, 9.0),  # the link's 8 s beyond 1 s of attention before the first dispatch
])
def test_block_chunks_by_hand(dispatch, compute, combine, before, after, seconds):
  assert exchange_model.chunk_pipeline(dispatch, compute, combine, 2, before_s=before,
                                   after_s=after) == pytest.approx(seconds)


def test_block_chunks_through_unrolled_layers_by_hand():
  # Layer 1 as above (chip busy to 6, C2 6–6.5); layer 2's attention of chunk 1 runs 6–7 while
  # C2 crosses, chunk 2's 7–8, D1' 7–7.5, D2' 8–8.5, E1' 8–10, E2' 10–12, C2' 12–12.5: the
  # last combine shows once in two layers.
  assert exchange_model.chunk_pipeline(1, 4, 1, 2, before_s=2, layers=2) == pytest.approx(12.5)
  assert exchange_model.chunk_pipeline(1, 4, 1, 2, before_s=2, layers=8) == pytest.approx(48.5)


def _dispatch_first(u, v, w, n):
  """Event by event: every dispatch back to back, each chunk's experts once its dispatch has
  landed and the previous chunk's are done, each combine once the link is free, its experts are
  done and every dispatch has gone."""
  experts_done = combine_done = 0.0
  for i in range(1, n + 1):
    experts_done = max(i * u, experts_done) + v
    combine_done = max(combine_done, experts_done, n * u) + w
  return combine_done


def test_chunk_pipeline_is_the_dispatch_first_schedule():
  rng = np.random.default_rng(0)
  for _ in range(200):
    dispatch, compute, combine, latency = rng.exponential(1.0, 4) * [1, 1, 1, 0.1]
    chunks = int(rng.integers(1, 9))
    u, v, w = dispatch / chunks + latency, compute / chunks, combine / chunks + latency
    modelled = exchange_model.chunk_pipeline(dispatch, compute, combine, chunks, latency)
    assert modelled == pytest.approx(_dispatch_first(u, v, w, chunks))
    assert modelled >= max(dispatch + combine, compute)  # never beats either resource alone
    if dispatch == combine and not latency:
      exposed = max(2 * dispatch / chunks, 2 * dispatch - compute)  # the docstring's form
      assert modelled - compute == pytest.approx(exposed)


def test_exposed_exchange_with_equal_ways_in_and_out():
  for a, c in ((1, 4), (2, 1), (1, 1.5), (3, 3)):
    for n in (1, 2, 3, 8):
      exposed = exchange_model.chunk_pipeline(a, c, a, n) - c
      assert exposed == pytest.approx(max(2 * a / n, 2 * a - c))


def _exchange(**fields):
  shape = dict(mesh={'data': 1, 'fsdp': 1, 'expert': 8, 'tensor': 1}, dispatch_groups=4,
               chunks=1, fp8=False, two_level=False, node_aware=True, pipelines=1,
               forward_passes=1,
               expert_flops=4.0, width=2, top_k=2, num_experts=8, num_groups=2, topk_groups=1)
  return exchange_model.Exchange(**{**shape, **fields})


@pytest.mark.parametrize('num_experts, top_k, nodes, num_groups, topk_groups, expected', [
    (8, 2, 2, 1, 1, 2 * (1 - 6 / 28)),  # 2 of 8 experts, 4 per node: C(4,2) / C(8,2) miss one
    (8, 2, 4, 4, 2, 2 * (1 - 1 / 6)),  # 2 reachable nodes of 2 experts each
    (8, 2, 4, 2, 1, 2 * (1 - 1 / 6)),  # one group, spread over 2 nodes
    (8, 2, 2, 2, 1, 1.0),  # groups are nodes, one kept
    (8, 1, 4, 1, 1, 1.0),
])
def test_destination_nodes_by_hand(num_experts, top_k, nodes, num_groups, topk_groups,
                                   expected):
  exchange = _exchange(num_experts=num_experts, top_k=top_k, num_groups=num_groups,
                       topk_groups=topk_groups)
  assert exchange_model.destination_nodes(exchange, nodes) == pytest.approx(expected)


def test_fp8_sends_a_byte_per_channel_and_a_float32_scale_per_128():
  assert exchange_model.fp8_ratio(2) == 0.515625
  assert exchange_model.fp8_ratio(4) == 0.515625 / 2


X = 2.0**20
# Two nodes of four devices; a link class's bytes of one all-to-all take a known time: X·3/4
# inside a node at 1.5·X/s is 0.5 s, X across at 0.5·X/s is 2 s. The experts take 4 s forward.
CHIP = dataclasses.replace(hardware.CHIPS['h100'], node_size=4, link_bandwidth=1.5 * X,
                           network_bandwidth=0.5 * X, link_latency=0.0, network_latency=0.0,
                           peak_flops=1.0)
FLAT = {'intra': 3 * X, 'inter': 4 * X}  # an 8-way exchange: 3 peers near, 4 far; 4 passes


@pytest.mark.parametrize('variant, chunks, intra, inter, exposed', [
    # 2 s in and out forward (experts 4 s) and backward (experts 8 s): nothing hidden.
    (exchange_model.Variant('flat'), 1, 3 * X, 4 * X, 8.0),
    # 4 chunks: one chunk's way in and out (1 s) per pass.
    (exchange_model.Variant('overlapped', chunks=0), 4, 3 * X, 4 * X, 2.0),
    # One copy per token and node (groups are the nodes, one kept): half the far bytes; every
    # copy fans out inside the node (8X buffer · 3/4): 1 s each way on either link.
    (exchange_model.Variant('two-level', two_level=True), 1, 6 * X, 2 * X, 4.0),
    # The forward dispatch (one all-to-all of four) at 0.515625 of the bytes.
    (exchange_model.Variant('fp8', fp8=True), 1, 3 * X * 0.87890625, 4 * X * 0.87890625, 7.03125),
    # Two levels and 4 chunks: 0.5 s per pass. FP8 on the rows that cross nodes only, so the
    # dispatch still takes 1 s inside the node.
    (exchange_model.Variant('combined', 0, fp8=True, two_level=True), 4, 6 * X,
     2 * X * 0.87890625, 1.0),
])
def test_exchange_variants_by_hand(variant, chunks, intra, inter, exposed):
  row = exchange_model.exchange_cost(_exchange(), FLAT, CHIP, variant)
  assert row['chunks'] == chunks and row['nodes'] == 2
  assert row['bytes'] == {'intra': pytest.approx(intra), 'inter': pytest.approx(inter)}
  assert row['exposed_s'] == pytest.approx(exposed)


def test_fp8_quantises_the_two_level_rows_that_cross_nodes():
  # The network at 0.25·X/s: a two-level all-to-all takes 2 s across nodes, 1 s inside; the
  # forward dispatch in FP8 1.03125 s across (0.515625 of the bytes), still 1 s inside.
  slow = dataclasses.replace(CHIP, network_bandwidth=0.25 * X)
  run = lambda variant: exchange_model.exchange_cost(_exchange(), FLAT, slow, variant)
  wide = run(exchange_model.Variant('two-level', 1, two_level=True))
  both = run(exchange_model.Variant('combined', 1, fp8=True, two_level=True))
  assert wide['exposed_s'] == pytest.approx(8.0)  # 2 + 2 forward, 2 + 2 backward
  assert both['exposed_s'] == pytest.approx(7.03125)
  assert both['bytes'] == {'intra': pytest.approx(6 * X),
                           'inter': pytest.approx(2 * X * 0.87890625)}


def test_two_levels_only_where_the_exchange_runs_them():
  both = exchange_model.Variant('combined', 1, fp8=True, two_level=True)
  fp8 = exchange_model.exchange_cost(_exchange(), FLAT, CHIP,
                                     exchange_model.Variant('fp8', fp8=True))
  # Dropless rows and expert choice stay flat, FP8 included.
  dropless = exchange_model.exchange_cost(_exchange(node_aware=False), FLAT, CHIP, both)
  assert dropless['bytes'] == fp8['bytes'] and dropless['exposed_s'] == fp8['exposed_s']
  # On one node there is no second level, and FP8 applies.
  one_node, inside = dataclasses.replace(CHIP, node_size=8), {'intra': 7 * X, 'inter': 0.0}
  combined = exchange_model.exchange_cost(_exchange(), inside, one_node, both)
  assert combined['nodes'] == 1
  assert combined['bytes'] == {'intra': pytest.approx(7 * X * 0.87890625), 'inter': 0.0}


def test_a_step_reports_its_exchange_and_exposed_communication():
  # 1 s of all-gather across nodes, not overlapped, and the exchange above.
  links = {4: {'exchange': FLAT, 'all-gather': {'intra': 0.0, 'inter': 0.5 * X}}}
  step = _step(10.0, links, _exchange(block_flops=2.0))
  row = cost_model.roofline(step, 1.0, CHIP)
  assert row['collective_s'] == {'all-gather': 1.0, 'exchange': 8.0}
  assert row['link_bytes'] == {'intra': 3 * X, 'inter': 4.5 * X}
  assert row['exposed_comm_s'] == 9.0 and row['step_s'] == 19.0
  variants = cost_model.exchange_variants(step, CHIP)
  assert [v['variant'] for v in variants] == ['flat', 'overlapped', 'two-level', 'fp8',
                                              'combined', 'block', 'combined, block']
  # Chunks of the whole block, 2 s of attention forward: in 4 chunks only one chunk's way in
  # (forward 0.5 s, backward 0.5 s; two levels 0.25 s each) shows.
  assert [v['exposed_comm_s'] for v in variants] == pytest.approx([9, 3, 5, 8.03125, 2, 2, 1.5])
  assert [v['step_s'] for v in variants] == pytest.approx([19, 13, 15, 18.03125, 12, 12, 11.5])
  assert [v['chunks'] for v in variants][-2:] == [4, 4]
  configured = cost_model.roofline(
      _step(10.0, links, _exchange(chunks=2, two_level=True)), 1.0, CHIP)['exchange']
  assert configured['variant'] == 'as configured' and configured['chunks'] == 2


def test_exchange_groups_are_those_the_compiled_exchange_uses():
  for mesh in ('expert=4 data=2', 'expert=4 tensor=2', 'expert=2 fsdp=2 tensor=2'):
    overrides = dict(item.split('=') for item in mesh.split())
    config = small_config('e8k2', *(f'--config.mesh.{axis}={overrides.get(axis, 1)}'
                                    for axis in ('data', 'fsdp', 'expert', 'tensor')))
    mesh = make_mesh(config, jax.devices()[:8])
    spec = jax.sharding.PartitionSpec(('data', 'fsdp', 'expert', 'tensor'))
    f = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, 'expert', 0, 0, tiled=True),
                              mesh=mesh, in_specs=spec, out_specs=spec))
    x = jax.ShapeDtypeStruct((64, 4), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec))
    (compiled, _), = hlo_stats.module_stats(f.lower(x).compile().as_text()).collectives
    assert exchange_model.exchange_shape(config, dict(mesh.shape)).groups == compiled.groups


def test_best_exchange_chunks():
  config = config_lib.load('configs/mixtral_8x7b.py', ['--config.train.batch_size=64'])
  mesh = {'data': 1, 'fsdp': 1, 'expert': 8, 'tensor': 1}  # 8 sequences per device
  h100 = hardware.CHIPS['h100']
  assert exchange_model.best_exchange_chunks(config, mesh, None) == 1  # a CPU: no figures
  assert exchange_model.best_exchange_chunks(config, {**mesh, 'expert': 1, 'data': 8}, h100) == 1
  # Mixtral's experts take ~10× a layer's exchange on NVLink: the more chunks, the less
  # exposed, up to one per sequence, where a chunk's latency is still small.
  assert exchange_model.best_exchange_chunks(config, mesh, h100) == 8
  # A latency as long as a chunk's exchange makes a few chunks best.
  slow = dataclasses.replace(h100, link_latency=2e-3)
  assert 1 < exchange_model.best_exchange_chunks(config, mesh, slow) < 8


@pytest.mark.parametrize('kind, chip', [('NVIDIA H100 80GB HBM3', 'h100'),
                                        ('NVIDIA H200', 'h200'), ('TPU v5p', 'tpu-v5p'),
                                        ('TPU v5 lite', 'tpu-v5e'), ('cpu', None)])
def test_device_kinds_name_their_chip(kind, chip):
  assert hardware.chip_for_device(kind) == (hardware.CHIPS[chip] if chip else None)


def test_auto_exchange_chunks_resolve_before_the_model_is_built():
  config = config_lib.load('configs/tiny.py', ['--config.mesh.expert=4',
                                               '--config.model.moe.exchange_chunks=0'])
  mesh = make_mesh(config, jax.devices()[:4])
  exchange_model.resolve_exchange_chunks(config, mesh)
  assert config.model.moe.exchange_chunks == 1  # no known chip here: nothing to overlap
  config.model.moe.exchange_chunks = 2
  exchange_model.resolve_exchange_chunks(config, mesh)
  assert config.model.moe.exchange_chunks == 2  # a set count stays


def test_moe_block_weights_by_hand():
  config = config_lib.load('configs/tiny.py', ['--config.model.moe.num_shared_experts=1'])
  # Queries, keys and values 128·(128 + 64 + 64), output 128·128, router 128·8, one shared
  # SwiGLU 3·128·256; the routed experts and the norms are not counted.
  assert exchange_model.moe_block_weights(config.model) == (
      128 * 256 + 128 * 128 + 128 * 8 + 3 * 128 * 256)
