"""What `model.fp8` changes in the cost model, checked by hand: the FLOPs in FP8 matmuls, the
chip's FP8 rate, and the bytes of expert weights gathered over FSDP in FP8."""

import dataclasses

import jax
import pytest

from moetrain import config as config_lib
from moetrain import cost_model, exchange_model, fp8_cost, hardware
from tests.test_cost_model import CHIP, FLAT, _exchange

TOKENS = 16 * 256  # configs/tiny.py: 16 sequences of 256 tokens
# tiny's FLOPs per token outside the FP8 matmuls: 4 routers (128 × 8), the tied output layer
# (128 × 8000), attention scores and sums over 256 keys (4 layers, 2 × 4 heads of 32), and the
# norms' scales, which the hand count counts with the weights (6 each; 2 a layer and a final).
ROUTERS, OUTPUT, ATTENTION = 6 * 4 * 128 * 8, 6 * 128 * 8000, 6 * 4 * 256 * 2 * 4 * 32
NORMS = 6 * (4 * 2 + 1) * 128


@pytest.mark.parametrize('remat', ['none', 'full', 'save_dots'])
def test_fp8_flops_are_the_step_but_router_output_layer_and_attention(remat):
  config = config_lib.load('configs/tiny.py', ['--config.model.fp8=blockwise',
                                               f'--config.train.remat={remat}'])
  hardware_flops = cost_model.hand_flops(config)['hardware']
  other = ROUTERS + OUTPUT + ATTENTION + NORMS
  # Rematerialised: the blocks' forward again (a third of their FLOPs), or attention's dots.
  other += {'none': 0, 'full': (ROUTERS + ATTENTION + NORMS) / 3,
            'save_dots': ATTENTION / 3}[remat]
  assert fp8_cost.fp8_flops(config, hardware_flops) == pytest.approx(
      hardware_flops - other * TOKENS)
  fraction = fp8_cost.fp8_fraction(config, cost_model.hand_flops)
  assert fraction == pytest.approx(1 - other * TOKENS / hardware_flops)
  none = config_lib.load('configs/tiny.py', [f'--config.train.remat={remat}'])
  assert fp8_cost.fp8_fraction(none, cost_model.hand_flops) == 0.0


@pytest.mark.parametrize('recipe, mesh, width', [
    ('blockwise', {'fsdp': 4, 'expert': 2}, 1 + 4 / 128**2),  # a float32 scale per tile
    ('tensorwise', {'fsdp': 4, 'expert': 2}, 1.0),  # one scale per expert, not gathered
    ('blockwise', {'fsdp': 8, 'expert': 2}, None),  # 512 / 8 = 64: tiles straddle the shards
    ('tensorwise', {'fsdp': 4, 'expert': 1}, None),  # no expert parallelism: GSPMD's gathers
    ('blockwise', {'fsdp': 1, 'expert': 8}, None),  # nothing to gather
    ('none', {'fsdp': 4, 'expert': 2}, None),
])
def test_expert_weights_gathered_in_fp8_by_hand(recipe, mesh, width):
  config = config_lib.load('configs/tiny.py', ['--config.model.d_model=512',
                                               f'--config.model.fp8={recipe}'])
  assert fp8_cost.gathered_width(config, mesh) == width


def test_fp8_matmuls_run_at_the_fp8_peak_where_the_chip_has_one():
  h100, v5p = hardware.CHIPS['h100'], hardware.CHIPS['tpu-v5p']
  assert h100.matmul_flops(fp8=True) == 1979e12 and h100.matmul_flops(fp8=False) == 989e12
  assert v5p.matmul_flops(fp8=True) == v5p.peak_flops  # no FP8 MXU: the bf16 rate
  flops = 4 * 1979e12
  assert fp8_cost.compute_seconds(flops, 0.75, h100) == pytest.approx(
      1979e12 / 989e12 + 3.0)
  assert fp8_cost.compute_seconds(flops, 0.75, v5p) == pytest.approx(flops / 459e12)
  step = cost_model.StepCost(
      devices=1, mesh={}, tokens=1, compile_seconds=0.0, xla_flops=0.0, flops=flops,
      xla_bytes_accessed=0.0, bytes_accessed=0.0, collective_bytes={}, collective_groups={},
      link_bytes={8: {}, 8960: {}}, exchange=None, xla_memory={},
      estimated_memory=dict.fromkeys(('params', 'optimizer', 'activations', 'total'), 0.0),
      fp8_fraction=0.75)
  assert cost_model.roofline(step, flops, h100)['compute_s'] == pytest.approx(1979 / 989 + 3)
  bf16 = cost_model.roofline(dataclasses.replace(step, fp8_fraction=0.0), flops, h100)
  assert bf16['compute_s'] == pytest.approx(4 * 1979 / 989)


def test_a_compiled_step_gathers_its_expert_weights_in_fp8():
  """One compilation for both (FP8 is modelled from the bf16 step): the all-gathers of expert
  weights in the exchange's shard_map move a byte a value plus the tiles' scales; the gradients'
  reduce-scatters, the exchange and GSPMD's gathers of the other weights keep their width."""
  flags = ['--config.model.d_model=256', '--config.model.num_heads=4',
           '--config.model.num_kv_heads=4', '--config.model.num_layers=2',
           '--config.model.vocab_size=512', '--config.model.max_seq_len=128',
           '--config.model.moe.d_expert=256', '--config.train.seq_len=128',
           '--config.train.batch_size=8', '--config.mesh.data=1', '--config.mesh.fsdp=2',
           '--config.mesh.expert=4']
  steps = {recipe: cost_model.step_cost(config_lib.load(
      'configs/bench_e8k2.py', flags + [f'--config.model.fp8={recipe}']), jax.devices()[:8])
           for recipe in ('none', 'blockwise')}
  bf16, fp8 = steps['none'], steps['blockwise']
  assert fp8.compile_seconds == bf16.compile_seconds  # the same compilation
  for kind in ('reduce-scatter', 'all-to-all'):
    assert fp8.collective_bytes[kind] == bf16.collective_bytes[kind]
  # 2 MoE layers × 3 blocks of 2 local experts [256, 256], half of each from the other fsdp
  # rank, once forward: bf16 (2 bytes) → 1 + 4/128² bytes a value.
  expert_gathers = 2 * 3 * (2 * 256 * 256) / 2
  saved = expert_gathers * (2 - (1 + 4 / 128**2))
  assert bf16.collective_bytes['all-gather'] - fp8.collective_bytes['all-gather'] == (
      pytest.approx(saved))
  assert bf16.fp8_fraction == 0 and 0.5 < fp8.fp8_fraction < 1


def test_fp8_experts_hide_less_of_the_exchange():
  """The exchange of test_cost_model (2 s each way and pass) with the experts at twice the rate:
  in 4 chunks forward T = max(4·(0.5 + 0.5), 0.5 + 4·0.5 + 0.5, …) = 4 s against 2 s of experts,
  backward 0.5 + 4·1 + 0.5 = 5 s against 4: 3 s exposed instead of 2."""
  chip = dataclasses.replace(CHIP, fp8_flops=2.0)
  overlapped = exchange_model.Variant('overlapped', chunks=0)
  bf16 = exchange_model.exchange_cost(_exchange(), FLAT, chip, overlapped)
  fp8 = exchange_model.exchange_cost(_exchange(fp8_matmuls=True), FLAT, chip, overlapped)
  assert bf16['exposed_s'] == pytest.approx(2.0)
  assert fp8['exposed_s'] == pytest.approx(3.0) and fp8['chunks'] == 4
