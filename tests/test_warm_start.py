"""Runs that start from existing weights: another checkpoint's, or dense ones upcycled."""

import json

import numpy as np
import pytest

import jax
from flax import nnx

import moetrain
from moetrain import checkpoint
from moetrain import config as config_lib
from moetrain import model_diff, train
from moetrain.state import build_model

SMALL = ['--config.train.batch_size=8', '--config.train.seq_len=64',
         '--config.train.eval_every=0', '--config.train.sample_tokens=0',
         '--config.train.log_every=1', '--config.train.warmup_steps=5']


def run(config_file, workdir, steps, *overrides):
  """Trains `steps` steps of a 2-layer `config_file` and returns the loss logged at each."""
  config = config_lib.load(config_file, [*SMALL, '--config.model.num_layers=2',
                                         f'--config.train.steps={steps}',
                                         f'--config.train.checkpoint_every={steps}',
                                         *overrides])
  train.run(config, str(workdir))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['loss'] for r in records if 'loss' in r and r.get('split') != 'eval']


def saved_weights(config_file, workdir, *overrides):
  """A freshly initialised model of `config_file` saved as a weights-only checkpoint."""
  config = config_lib.load(config_file, overrides)
  _, params, buffers = nnx.split(build_model(config.model, 0), nnx.Param, ...)
  to_pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(workdir, to_pure(params), to_pure(buffers), config)
  return workdir


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  """The tiny dense config trained for 40 steps: (workdir, its losses)."""
  workdir = tmp_path_factory.mktemp('dense')
  return workdir, run('configs/tiny_dense.py', workdir, 40)


def test_upcycled_tiny_model_starts_at_the_dense_models_loss_and_logits(dense_run, tmp_path):
  dense_dir, dense_losses = dense_run
  # The trained dense model's loss on the first batch (a warm start reads the same batches).
  dense_first = run('configs/tiny_dense.py', tmp_path / 'dense_again', 1,
                    f'--config.init.from_checkpoint={dense_dir}')[0]
  # A zero learning rate saves the weights as upcycled; the first loss is taken before the
  # update either way.
  upcycled_first = run('configs/tiny.py', tmp_path / 'moe', 1,
                       f'--config.init.upcycle_from={dense_dir}',
                       '--config.train.learning_rate=0.0')[0]
  assert dense_losses[-1] < dense_losses[0] - 1.5  # the dense model did learn
  # Training routes with capacity 1.25: the few tokens dropped at step 0 cost a little.
  assert abs(upcycled_first - dense_first) < 0.05, (upcycled_first, dense_first)

  dense, _ = moetrain.load(dense_dir)
  moe, config = moetrain.load(tmp_path / 'moe')
  assert config.model.moe.num_experts == 8
  tokens = np.random.default_rng(0).integers(0, 8000, (2, 32))
  # `load` routes dropless: the upcycled model computes the dense one's logits.
  np.testing.assert_allclose(np.asarray(moe(tokens)), np.asarray(dense(tokens)), atol=1e-5)


def test_warm_start_from_another_model_names_the_field(tmp_path, capsys):
  dense_dir = saved_weights('configs/tiny_dense.py', tmp_path / 'dense')
  code = train.main(['--config', 'configs/tiny_dense.py', '--workdir', str(tmp_path / 'w'),
                     *SMALL, '--config.model.d_model=64',
                     f'--config.init.from_checkpoint={dense_dir}'])
  error = capsys.readouterr().err.strip()
  assert code == 2
  assert error.startswith('moetrain: error: init.from_checkpoint=')
  assert 'holds a different model (model.d_model=128→64)' in error
  assert len(error.splitlines()) == 1
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_upcycling_an_moe_checkpoint_is_refused(tmp_path, capsys):
  saved_weights('configs/tiny.py', tmp_path / 'moe')
  code = train.main(['--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'w'), *SMALL,
                     f'--config.init.upcycle_from={tmp_path / "moe"}'])
  error = capsys.readouterr().err.strip()
  assert code == 2 and 'holds an MoE model' in error and len(error.splitlines()) == 1


def _small(*flags):
  return config_lib.load('configs/tiny.py', ['--config.model.d_model=32', '--config.model.d_ff=64',
                                             '--config.model.num_layers=2', *flags])


def test_blocking_fields_are_those_that_change_an_arrays_shape():
  saved = _small('--config.model.vocab_size=4000', '--config.model.moe.aux_loss_weight=0.1',
                 '--config.model.moe.capacity_factor=2.0', '--config.train.steps=7').to_dict()
  assert model_diff.blocking_fields(saved, _small()) == ['model.vocab_size=4000→8000']


def test_the_same_width_written_two_ways_does_not_block():
  # d_expert=0 means "the width of d_ff": the arrays are those of an explicit d_expert=64.
  explicit = _small('--config.model.moe.d_expert=64').to_dict()
  assert model_diff.blocking_fields(explicit, _small()) == []
  wider = _small('--config.model.moe.d_expert=96').to_dict()
  assert model_diff.blocking_fields(wider, _small()) == ['model.moe.d_expert=96→0']


def test_a_field_an_older_checkpoint_lacks_is_read_at_its_default():
  saved = _small().to_dict()
  del saved['model']['moe']['num_shared_experts'], saved['model']['moe']['z_loss_weight']
  current = _small('--config.model.moe.num_shared_experts=1', '--config.model.moe.z_loss_weight=0')
  assert model_diff.blocking_fields(saved, current) == ['model.moe.num_shared_experts=0→1']


def test_fields_that_change_shapes_together_are_each_listed():
  saved = _small('--config.model.num_heads=2', '--config.model.num_kv_heads=1').to_dict()
  current = _small('--config.model.num_heads=4', '--config.model.num_kv_heads=4')
  assert model_diff.blocking_fields(saved, current) == ['model.num_heads=2→4',
                                                        'model.num_kv_heads=1→4']


def test_a_saved_value_that_cannot_be_put_back_is_listed():
  saved = _small().to_dict()
  saved['model']['num_layers'] = 'two'
  assert model_diff.blocking_fields(saved, _small()) == ["model.num_layers='two'→2"]


def test_a_checkpoint_without_prediction_modules_restores_the_rest_and_starts_them_fresh(
    tmp_path, capsys):
  plain_dir = tmp_path / 'plain'
  saved_weights('configs/tiny.py', plain_dir, '--config.model.num_layers=2')
  # A zero learning rate saves the weights the run started from.
  run('configs/tiny.py', tmp_path / 'mtp', 1, '--config.model.mtp_layers=1',
      f'--config.init.from_checkpoint={plain_dir}', '--config.train.learning_rate=0.0')
  assert ('has no multi-token-prediction modules, so the 1 here start fresh'
          in capsys.readouterr().err)
  weights = lambda model: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model,
                                                                             nnx.Param)))
  started, config = moetrain.load(tmp_path / 'mtp')
  started = weights(started)
  plain = weights(moetrain.load(plain_dir)[0])
  fresh = weights(build_model(config.model, config.train.seed))
  assert sorted(started) == sorted(plain) + ['mtp']
  jax.tree.map(np.testing.assert_array_equal, {k: started[k] for k in plain}, plain)
  # The run initialised its modules inside jit, this reference eagerly: equal up to rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               started['mtp'], fresh['mtp'])
