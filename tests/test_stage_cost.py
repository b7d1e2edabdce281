"""Pipeline stages in the cost model: the schedule's formulas by hand, the stage stand-ins
against the compiled pipelined step, and the stage count picked."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from moetrain import config as config_lib
from moetrain import cost_model, pipeline_model, stage_cost, summary
from moetrain.parallel import stages as schedule
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, make_setup

# bench_e8k2 at CPU size: a leading dense block and 4 scanned MoE units, bf16.
SMALL = ['--config.model.d_model=256', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=4', '--config.model.num_layers=5',
         '--config.model.vocab_size=512', '--config.model.max_seq_len=128',
         '--config.model.scan_layers=true', '--config.model.moe.first_dense_layers=1',
         '--config.model.moe.d_expert=256', '--config.train.seq_len=128',
         '--config.train.batch_size=32', '--config.mesh.data=1', '--config.mesh.expert=4']


def small_config(*overrides):
  return config_lib.load('configs/bench_e8k2.py', SMALL + list(overrides))


ROOT = pathlib.Path(__file__).resolve().parents[1]


def benchmark(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


MESH = {'stage': 2, 'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}


@pytest.mark.parametrize('stages, microbatches, repeats, steps, bubble', [
    (4, 8, 1, 11, 3 / 11), (4, 8, 2, 19, 3 / 19), (2, 4, 1, 5, 1 / 5), (1, 4, 1, 4, 0.0)])
def test_bubble_by_hand(stages, microbatches, repeats, steps, bubble):
  assert schedule.iterations(stages, microbatches, repeats) == steps
  assert schedule.bubble_fraction(stages, microbatches, repeats) == pytest.approx(bubble)


def test_bytes_over_the_stage_axis_by_hand():
  config = small_config('--config.train.microbatches=4')
  # One microbatch on a device: 32 / 4 / 4 sequences of 128 tokens × 256 channels in bf16.
  one = 2 * 128 * 256 * 2
  assert stage_cost.microbatch_bytes(config, MESH) == one
  # T = 5 iterations, each way; gathering the inputs in and sending the outputs out each
  # move (S − 1)/S of M microbatches each way.
  assert stage_cost.stage_bytes(config, MESH) == {'permute': 10 * one, 'input': 4 * one,
                                                  'output': 4 * one}
  assert stage_cost.stage_bytes(config, {**MESH, 'stage': 1}) == dict.fromkeys(
      ('permute', 'input', 'output'), 0.0)
  circular = small_config('--config.train.microbatches=4', '--config.model.pipeline_repeats=2')
  assert stage_cost.stage_bytes(circular, MESH)['permute'] == 2 * 9 * one  # T = 4·2 + 1


def test_stages_cross_nodes_when_a_stage_fills_one():
  assert stage_cost.stage_groups(MESH) == [[i, i + 4] for i in range(4)]
  assert stage_cost.stage_link(MESH, node_size=8) == 'intra'  # both stages on one node
  assert stage_cost.stage_link(MESH, node_size=4) == 'inter'  # a node each
  sixteen = {**MESH, 'data': 2}
  assert stage_cost.stage_groups(sixteen)[1] == [1, 9]
  assert stage_cost.stage_link(sixteen, node_size=8) == 'inter'


def test_pipeline_activations_by_hand():
  config = small_config('--config.train.microbatches=4', '--config.train.remat=full')
  per_layer, per_logit = 1000.0, 10.0
  parts = stage_cost.pipeline_activations(config, MESH, per_layer, per_logit)
  micro_tokens, stage_tokens = 2 * 128, 4 * 128  # per device: 32/4/4 and 32/2/4 sequences
  assert parts['stack'] == 5 * 2 * micro_tokens * per_layer  # T = 5 iterations of K = 2 units
  assert parts['outside'] == stage_tokens * (1 * per_layer + per_logit)  # the dense block
  assert parts['buffers'] == 2 * 4 * stage_cost.microbatch_bytes(config, MESH)
  assert summary.layer_token_bytes(config) == 256 * 2  # the block's bf16 input


def test_summary_reports_the_pipeline():
  config = small_config('--config.mesh.stage=2', '--config.train.microbatches=4')
  setup = make_setup(config, make_mesh(config, jax.devices()[:8]))
  state = abstract_state(setup)
  memory = summary.memory_per_device(setup, state)
  per_layer = summary.layer_token_bytes(config)
  assert memory['activations'] == pytest.approx(sum(stage_cost.pipeline_activations(
      config, dict(setup.mesh.shape), per_layer, 512 * 8).values()))
  line, = [line for line in summary.describe(setup, state) if line.startswith('pipeline:')]
  assert line.startswith('pipeline: 2 stages × 1 repeat (GPipe), 4 microbatches, 5 '
                         'iterations of 2 of the 4 stack units: bubble 20%; per step and device '
                         '1.2 MiB sent to the next stage')
  unstaged = make_setup(small_config(), make_mesh(small_config(), jax.devices()[:4]))
  assert not [line for line in summary.describe(unstaged, abstract_state(unstaged))
              if line.startswith('pipeline:')]


@functools.lru_cache(maxsize=None)
def modelled_and_compiled():
  config = small_config('--config.mesh.stage=2', '--config.train.microbatches=4')
  return (pipeline_model.pipelined_cost(config, 8),
          cost_model.step_cost(config, jax.devices()[:8]))


def test_stage_stand_ins_model_the_compiled_pipelined_step():
  """Two compiled stand-ins of one stage (2 and 4 units, one microbatch, 4 devices) against
  the pipelined step itself compiled for 8 devices."""
  modelled, compiled = modelled_and_compiled()
  assert modelled.iterations == 5 and modelled.bubble == pytest.approx(0.2)
  # The placeholder iterations compute: the stack's FLOPs are T/M = 5/4 of the useful ones.
  assert modelled.flops == pytest.approx(compiled.flops, rel=0.02)
  assert modelled.collective_bytes['all-to-all'] == pytest.approx(
      compiled.collective_bytes['all-to-all'], rel=0.05)
  # The stand-in's weights are one stage's: the stack's over the stages, the rest whole.
  for part in ('params', 'optimizer'):
    assert modelled.estimated_memory[part] == compiled.estimated_memory[part]
  # The compiled step moves at least what the schedule needs between stages.
  assert compiled.collective_bytes['collective-permute'] >= modelled.stage_bytes['permute']
  assert modelled.exchange.pipelines == 10  # 5 iterations × 2 units, each one MoE layer


def test_without_stages_the_model_is_the_step_it_folds():
  """S = 1 and M = 2: the stand-ins' unit and rest recombine into the microbatched step."""
  config = small_config('--config.train.microbatches=2')
  modelled = pipeline_model.pipelined_cost(config, 4)
  compiled = cost_model.step_cost(config, jax.devices()[:4])
  assert modelled.bubble == 0.0 and modelled.stage_bytes['permute'] == 0.0
  # What runs once per step (the update, for one) counts M/S times in the rest: 1% here.
  assert modelled.flops == pytest.approx(compiled.flops, rel=0.02)
  assert modelled.collective_bytes['all-to-all'] == pytest.approx(
      compiled.collective_bytes['all-to-all'], rel=0.05)


def test_minimum_traffic_reads_the_stack_every_iteration():
  modelled, _ = modelled_and_compiled()
  memory = modelled.estimated_memory
  base = 6 * memory['params'] + 2 * memory['optimizer'] + 2 * memory['activations']
  # T/R = 5 reads of the stage's units forward and backward instead of one.
  assert modelled.minimum_traffic == pytest.approx(base + 2 * 4 * modelled.stack_params)
  assert 0 < modelled.stack_params < memory['params']


def test_stage_candidates_of_deepseek_v3():
  config = config_lib.load('configs/deepseek_v3.py', [])
  # 58 MoE units: 2 is the only count above 1 that also divides 256 devices.
  assert pipeline_model.stage_candidates(config, 256) == [1, 2]
  assert pipeline_model.with_stages(config, 2).train.microbatches == 4
  dense = small_config('--config.model.moe.num_experts=0', '--config.model.num_layers=4',
                       '--config.mesh.expert=1', '--config.mesh.data=-1')
  assert pipeline_model.stage_candidates(dense, 8) == [1, 2, 4]  # a dense model's 4 blocks
  assert pipeline_model.stage_candidates(dense, 2) == [1, 2]


def _row(stages, fits, step_s):
  return {'stages': stages, 'roofline': {'h100': {'fits': fits, 'step_s': step_s}}}


def test_pick_stages():
  rows = [_row(1, False, 1.0), _row(2, True, 3.0), _row(4, True, 2.0)]
  assert pipeline_model.pick_stages(rows, 'h100')['stages'] == 2
  assert pipeline_model.pick_stages(rows, 'h100', by='time')['stages'] == 4
  assert pipeline_model.pick_stages(rows[:1], 'h100') is None


def test_model_mode_reports_the_pipeline(tmp_path):
  """tools/benchmark.py model with stages: the schedule, the bytes between stages and one
  stage's memory (--pick-stages adds `stage_candidates` and `pick_stages`, tested above)."""
  tiny = ['--config', 'configs/tiny.py', '--devices', '4', '--chips', 'h100',
          '--config.model.scan_layers=true', '--config.model.num_layers=2',
          '--config.train.batch_size=8', '--config.train.seq_len=32',
          '--config.train.microbatches=2']
  out = tmp_path / 'model.json'
  result = benchmark('model', *tiny, '--mesh', 'stage=2,data=1,expert=2', '--json', str(out))
  assert result.returncode == 0, result.stderr
  assert 'pipeline: 2 stages × 1 repeat (GPipe), 2 microbatches, 3 iterations' in result.stdout
  assert 'bubble 33%' in result.stdout and 'one stage keeps activations' in result.stdout
  report = json.loads(out.read_text())
  assert report['stages'] == 2 and report['bubble'] == pytest.approx(1 / 3)
  assert report['stage_bytes']['permute'] == report['collective_bytes']['stage permute'] > 0
