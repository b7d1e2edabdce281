"""The compiled-step cost model against hand counts: FLOPs, all-to-all volume, memory per device.

The bench configs shrunk to CPU size keep their structure (E8 top-2; E64 top-8 with a shared
expert; bf16; scanned layers, so the loop-trip corrections are exercised).
"""

import functools

import jax
import pytest

from moetrain import config as config_lib
from moetrain import cost_model, hardware

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


@pytest.mark.parametrize('name, mesh', [('e8k2', 'expert=8'), ('e64k8', 'expert=8'),
                                        ('e64k8', 'expert=4 data=2')])
def test_all_to_all_bytes_equal_the_analytic_volume(name, mesh):
  axes = dict(item.split('=') for item in mesh.split())
  overrides = tuple(f'--config.mesh.{axis}={axes.get(axis, 1)}'
                    for axis in ('data', 'fsdp', 'expert', 'tensor'))
  step = cost(name, 8, *overrides)
  analytic = cost_model.all_to_all_bytes(small_config(name, *overrides),
                                         expert_parallel=int(axes['expert']), batch_shards=8)
  assert step.collective_groups['all-to-all'] == int(axes['expert'])
  assert step.collective_bytes['all-to-all'] == pytest.approx(analytic, rel=0.10)


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


def test_roofline_of_a_compute_bound_step():
  chip = hardware.CHIPS['h100']
  step = cost_model.StepCost(
      devices=8, mesh={}, tokens=1000, compile_seconds=0.0, xla_flops=0.0,
      flops=chip.peak_flops, xla_bytes_accessed=0.0, bytes_accessed=0.0,
      collective_bytes={'all-to-all': chip.link_bandwidth / 4},
      collective_groups={'all-to-all': 8},
      collectives_in_domain={'all-to-all': {8: True}}, xla_memory={},
      estimated_memory={'params': 1e9, 'optimizer': 2e9, 'activations': 1e9, 'total': 4e9})
  row = cost_model.roofline(step, model_flops=4 * chip.peak_flops, chip=chip)
  assert row['compute_s'] == 1.0 and row['collective_s'] == {'all-to-all': 0.25}
  assert row['memory_s'] == pytest.approx(12e9 / chip.hbm_bandwidth)
  assert row['step_s'] == 1.25 and row['overlapped_step_s'] == 1.0
  assert row['mfu'] == pytest.approx(4 / (8 * 1.25))
  assert row['fits']
  step.collectives_in_domain['all-to-all'][8] = False  # across nodes: the slower network
  assert cost_model.roofline(step, 1.0, chip)['collective_s']['all-to-all'] == pytest.approx(
      chip.link_bandwidth / 4 / chip.network_bandwidth)


@pytest.mark.parametrize('kind, chip', [('NVIDIA H100 80GB HBM3', 'h100'),
                                        ('NVIDIA H200', 'h200'), ('TPU v5p', 'tpu-v5p'),
                                        ('TPU v5 lite', 'tpu-v5e'), ('cpu', None)])
def test_device_kinds_name_their_chip(kind, chip):
  assert hardware.chip_for_device(kind) == (hardware.CHIPS[chip] if chip else None)
