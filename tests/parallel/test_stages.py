"""Pipeline parallelism: the main layer stack split over a `stage` mesh axis gives the
single-device step on every mesh it composes with, under both schedules, holds 1/stages of the
stack on each device and moves activations between stages by collective-permutes."""

import functools
import math
import re

import jax
import numpy as np
import pytest

from moetrain import checkpoint, config as config_lib, hlo_stats, trainer
from moetrain.models import layout
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, init_state, make_setup
from moetrain.steps import make_train_step
from tests.steps import compiled_train_step, first_gradients, random_batch, train

# 8 MoE layers: 8 units split over 4 stages × 2 rounds as well as over 2 × 1.
SMALL = ['--config.model.vocab_size=64', '--config.model.d_model=32', '--config.model.d_ff=48',
         '--config.model.num_layers=8', '--config.model.max_seq_len=16',
         '--config.model.scan_layers=true', '--config.train.batch_size=16',
         '--config.train.seq_len=16', '--config.train.microbatches=4',
         '--config.model.moe.capacity_factor=1.0', '--config.model.moe.min_capacity=1',
         '--config.train.sample_tokens=0', '--config.train.warmup_steps=2']

MESHES = {
    'stage2_expert2_fsdp2': ['--config.mesh.stage=2', '--config.mesh.expert=2',
                             '--config.mesh.fsdp=2', '--config.mesh.data=1'],
    'stage2_tensor2_data2': ['--config.mesh.stage=2', '--config.mesh.tensor=2',
                             '--config.mesh.data=2'],
    'stage4_expert2': ['--config.mesh.stage=4', '--config.mesh.expert=2',
                       '--config.mesh.data=1'],
}
SCHEDULES = {'gpipe': [], 'circular': ['--config.model.pipeline_repeats=2']}


def small_config(*overrides):
  return config_lib.load('configs/tiny.py', SMALL + list(overrides))


def devices_for(config):
  return jax.devices()[:math.prod(config.mesh[axis] for axis in
                                  ('stage', 'data', 'fsdp', 'expert', 'tensor'))]


def per_layer(tree, config):
  """Per-layer names, so that GPipe's [units] and circular's [rounds, units / rounds] compare."""
  return layout.to_layers(tree, config.model)


# Three meshes with stage, expert, fsdp, tensor and data axes, the schedules taking turns; two
# cases also vary what runs inside the stages: one rematerialises every block and runs each
# microbatch's rows in two chunks of the whole block, two layers per scan iteration; one routes
# dropless (the exchange's ragged form) and predicts a second token ahead with an MoE block
# after the head (multi-token prediction, microbatch by microbatch over the stages).
CASES = {('stage2_expert2_fsdp2', 'gpipe'): [],
         ('stage2_tensor2_data2', 'circular'): [
             '--config.train.remat=full', '--config.model.moe.exchange_overlap=block',
             '--config.model.moe.exchange_chunks=2', '--config.model.scan_unroll=2'],
         ('stage4_expert2', 'circular'): ['--config.model.moe.capacity_factor=0',
                                          '--config.model.mtp_layers=1']}


@functools.cache
def single_device_step(*overrides):
  """(per-layer gradients, metrics) of step one on one device."""
  config = small_config('--config.mesh.data=1', *overrides)
  grads, metrics, _ = first_gradients(config, jax.devices()[:1],
                                      random_batch(config, padding=3))[0]
  return per_layer(grads, config), metrics


@pytest.mark.parametrize('mesh,schedule', CASES)
def test_first_step_equals_the_single_device_step(mesh, schedule):
  variant = CASES[mesh, schedule]
  dropless = '--config.model.moe.capacity_factor=0' in variant
  expected, single = single_device_step(*(variant if dropless else []))
  config = small_config(*MESHES[mesh], *SCHEDULES[schedule], *variant)
  grads, metrics, _ = first_gradients(config, devices_for(config),
                                      random_batch(config, padding=3))[0]
  assert (single['dropped_fraction'].max() > 0) != dropless  # capacity drops choices
  assert ('mtp_loss' in single) == ('mtp_loss' in metrics) == ('--config.model.mtp_layers=1'
                                                               in variant)
  for key in ('loss', 'aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction', 'mtp_loss'):
    if key in single:
      np.testing.assert_allclose(metrics[key], single[key], rtol=2e-5, atol=1e-7, err_msg=key)
  grads = per_layer(grads, config)
  assert sorted(grads) == sorted(expected)
  for name, grad in grads.items():
    np.testing.assert_allclose(grad, expected[name], rtol=1e-4, atol=1e-7, err_msg=name)


def batch_at(step):
  return random_batch(small_config(), seed=step)


@functools.cache
def single_device_run():
  return train(small_config('--config.mesh.data=1', *BIAS_BALANCED), jax.devices()[:1],
               batch_at, 20)


BIAS_BALANCED = ['--config.model.moe.router=sigmoid', '--config.model.moe.bias_update_rate=0.01']


# Twenty steps once (a train step compiles per case; the first-step test covers every mesh
# and both schedules).
def test_twenty_steps_follow_the_single_device_run():
  single, _, _ = single_device_run()
  config = small_config(*MESHES['stage2_expert2_fsdp2'], *SCHEDULES['circular'],
                        *BIAS_BALANCED)
  losses, _, _ = train(config, devices_for(config), batch_at, 20)
  assert single[-1] < single[0] - 0.05  # it trains
  np.testing.assert_allclose(losses, single, rtol=1e-3)


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_each_device_holds_one_stage_of_the_stack_and_its_optimizer_state(schedule):
  config = small_config('--config.mesh.stage=4', '--config.mesh.data=2', *SCHEDULES[schedule])
  state = abstract_state(make_setup(config, make_mesh(config, jax.devices()[:8])))

  def stack_bytes(tree, per_device):
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if 'moe_stack' in jax.tree_util.keystr(path):
        shape = leaf.sharding.shard_shape(leaf.shape) if per_device else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total
  for part in ('params', 'opt_state'):
    whole, held = stack_bytes(state[part], False), stack_bytes(state[part], True)
    assert whole > 0
    np.testing.assert_allclose(held / whole, 1 / 4, rtol=0.05, err_msg=part)


def test_a_checkpoint_saved_with_two_stages_restores_and_resumes_with_one_and_four(tmp_path):
  circular = [*SCHEDULES['circular'], *BIAS_BALANCED]

  def run(config, state_or_none, steps, save_at=None):
    """(losses, state at `save_at`) of `steps` train steps from `state_or_none` (fresh)."""
    setup = make_setup(config, make_mesh(config, devices_for(config)))
    with jax.set_mesh(setup.mesh):
      state = init_state(setup) if state_or_none is None else state_or_none(setup)
      step, losses, saved = make_train_step(setup), [], None
      for i in steps:
        state, metrics = step(state, trainer.global_batch(setup, batch_at(i)))
        losses.append(float(metrics['loss']))
        if i + 1 == save_at:
          manager = checkpoint.manager(tmp_path)
          checkpoint.save(manager, i + 1, state, {}, config=config)
          manager.wait_until_finished()
          saved = jax.device_get(state)
      return losses, saved

  two = small_config(*MESHES['stage2_expert2_fsdp2'], *circular)
  uninterrupted, saved = run(two, None, range(4), save_at=2)

  def restored(setup):
    state, _ = checkpoint.restore_latest(checkpoint.manager(tmp_path), abstract_state(setup),
                                         setup.config, log=lambda line: None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved)  # bit for bit
    return state
  for stage in (1, 4):
    other = small_config(f'--config.mesh.stage={stage}', '--config.mesh.data=1', *circular)
    resumed, _ = run(other, restored, range(2, 4))
    np.testing.assert_allclose(resumed, uninterrupted[2:], rtol=1e-5, err_msg=f'{stage=}')


def cross_stage_collectives(hlo_text: str, kind: str, stage_of) -> list[tuple[int, ...]]:
  """Result shapes of the `kind` collectives in compiled HLO whose groups span stages."""
  shapes = []
  for line in hlo_text.splitlines():
    match = re.search(r'= \w+\[([0-9,]*)\][^ ]* ' + kind + r'\((.*)', line)
    pairs = re.findall(r'\{(\d+),(\d+)\}', match.group(2).split('source_target_pairs=')[-1]
                       ) if match and kind == 'collective-permute' else []
    groups = ([[int(a), int(b)] for a, b in pairs] if pairs else
              hlo_stats.replica_groups(match.group(2)) if match else [])
    if any(len({stage_of(d) for d in group}) > 1 for group in groups):
      shapes.append(tuple(int(d) for d in match.group(1).split(',') if d))
  return shapes


def test_the_step_permutes_activations_over_stages_and_gathers_no_stack_weights():
  config = small_config(*MESHES['stage2_expert2_fsdp2'])
  text = compiled_train_step(config, devices_for(config))
  stage_of = lambda device: device // 4  # the stage axis is outermost
  # Each microbatch's activations [B/M, L, D] on 4 devices, between the two stages.
  assert (1, 1, 16, 32) in cross_stage_collectives(text, 'collective-permute', stage_of)
  # All-gathers over stages carry routing scores and the microbatches every stage holds,
  # never a weight of the stack: those have its 8 units (or 4 per stage) in front.
  for shape in cross_stage_collectives(text, 'all-gather', stage_of):
    assert len(shape) < 3 or shape[0] not in (4, 8), shape

