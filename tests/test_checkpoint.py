"""Checkpoints restore onto any mesh; non-finite steps are skipped, counted and stopped;
reading a checkpoint logs no read-only notice."""

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moetrain import checkpoint
from moetrain import config as config_lib
from moetrain import trainer
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, init_state, make_setup
from moetrain.steps import make_train_step


def small_config(*overrides):
  return config_lib.load('configs/tiny.py', [
      '--config.model.vocab_size=64', '--config.model.d_model=32', '--config.model.d_ff=64',
      '--config.model.num_layers=2', '--config.model.max_seq_len=16',
      '--config.train.batch_size=8', '--config.train.seq_len=16', '--config.train.steps=20',
      '--config.train.warmup_steps=0', *overrides])


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, config.model.vocab_size,
                        (config.train.batch_size, config.train.seq_len + 1))
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32)}


def setup_on(mesh_axes, devices, *overrides):
  data, fsdp, expert, tensor = mesh_axes
  config = small_config(f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
                        f'--config.mesh.expert={expert}', f'--config.mesh.tensor={tensor}',
                        *overrides)
  return make_setup(config, make_mesh(config, devices))


@pytest.mark.parametrize('target', [(1, 1, 1, 1), (1, 1, 4, 2)], ids=['1-device', '1x1x4x2'])
def test_checkpoint_from_one_mesh_restores_onto_another(tmp_path, target):
  source = setup_on((2, 2, 2, 1), jax.devices()[:8])
  with jax.set_mesh(source.mesh):
    state = init_state(source)
    state, _ = make_train_step(source)(state, trainer.global_batch(
        source, random_batch(source.config)))  # moments and bias no longer zero
    manager = checkpoint.manager(tmp_path)
    checkpoint.save(manager, 1, state, {'data_rows': 8}, config=source.config)
    manager.wait_until_finished()
    saved = jax.device_get(state)

  devices = jax.devices()[:1] if target == (1, 1, 1, 1) else jax.devices()[:8]
  destination = setup_on(target, devices)
  with jax.set_mesh(destination.mesh):
    restored, progress = checkpoint.restore_latest(
        checkpoint.manager(tmp_path), abstract_state(destination), destination.config)
  assert progress['data_rows'] == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  jax.tree.map(lambda array, sharding: (array.sharding == sharding) or pytest.fail(
      f'{array.sharding} != {sharding}'), restored, destination.state_shardings)


def test_retention_keeps_the_latest_and_the_permanent_steps(tmp_path):
  config = small_config()
  manager = checkpoint.manager(tmp_path, keep=2, permanent_every=4)
  for step in range(1, 10):
    checkpoint.save(manager, step, {'step': np.int32(step)}, {'data_rows': step},
                    config=config)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4, 8, 9]


def nan_router(state):
  """The state with one router weight made NaN: every loss it produces is NaN."""
  params = jax.tree.map(lambda x: x, state['params'])
  router = params['blocks'][0]['ffn']['router']
  params['blocks'][0]['ffn']['router'] = router.at[0, 0].set(np.nan)
  return {**state, 'params': params}


def test_non_finite_step_skips_the_update():
  setup = setup_on((1, 1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(setup.mesh):
    state = nan_router(init_state(setup))
    before = jax.device_get(state)
    batch = trainer.global_batch(setup, random_batch(setup.config))
    state, metrics = make_train_step(setup)(state, batch)
  assert int(metrics['skipped']) == 1 and not np.isfinite(float(metrics['loss']))
  assert int(state['step']) == 1  # the step (and its batch) is consumed
  for name in ('params', 'buffers', 'opt_state'):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(state[name]),
                 before[name])


class Recorder:
  def __init__(self):
    self.records, self.saved = [], []

  def write(self, step, record, split='train'):
    self.records.append((step, split))
    return {'loss': float(record['loss'])}

  def save(self, step, state):
    self.saved.append(step)


def test_run_stops_after_max_nonfinite_steps_in_a_row():
  setup = setup_on((1, 1, 1, 1), jax.devices()[:1])
  config = setup.config
  batches = iter([random_batch(config, seed) for seed in range(20)])
  recorder = Recorder()
  with jax.set_mesh(setup.mesh):
    state = nan_router(init_state(setup))
    with pytest.raises(trainer.NonFiniteError,
                       match=r'10 consecutive steps up to step 10 had a non-finite'):
      trainer.train_loop(setup, state, batches, [], recorder, save=recorder.save)
  assert recorder.saved == []  # checkpoint_every=1000: nothing but the last good one survives


def test_isolated_non_finite_steps_are_counted_and_training_goes_on():
  setup = setup_on((1, 1, 1, 1), jax.devices()[:1], '--config.train.steps=12',
                   '--config.train.log_every=1', '--config.train.max_nonfinite_steps=2')
  # Good batches alternate with poisoned ones: a token id past the vocabulary embeds as NaN.
  good = [random_batch(setup.config, seed) for seed in range(6)]
  poisoned = [dict(batch, inputs=np.full_like(batch['inputs'], 10**6)) for batch in good]
  recorder = Recorder()
  with jax.set_mesh(setup.mesh):
    state = init_state(setup)
    state, summary = trainer.train_loop(setup, state, iter([b for pair in zip(good, poisoned)
                                                            for b in pair]), [], recorder)
  assert summary['skipped_steps'] == 6 and int(state['step']) == 12
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state['params']))


def test_reading_a_checkpoint_logs_no_read_only_notice(tmp_path, caplog):
  config = small_config()
  setup = make_setup(config, make_mesh(config, jax.devices()[:1]))
  state = init_state(setup)
  checkpoint.save_model(tmp_path / 'model', state['params'], state['buffers'], config)
  with caplog.at_level(logging.WARNING, logger='absl'):
    ocp.CheckpointManager(checkpoint.directory(tmp_path / 'model'),
                          options=ocp.CheckpointManagerOptions(read_only=True))
  assert 'read only' in caplog.text  # what Orbax says, unfiltered
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert checkpoint.model_config(tmp_path / 'model').model.d_model == 32
    checkpoint.manager(checkpoint.directory(tmp_path / 'model'), read_only=True)
  assert 'read only' not in caplog.text
