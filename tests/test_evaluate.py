"""python -m moetrain.evaluate: loss and perplexity of a checkpoint, dropless."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moetrain
from moetrain import checkpoint, evaluate
from moetrain import config as config_lib
from moetrain.data.inputs import fixed_batches, load_tokenizer
from moetrain.data.packing import document_segments
from moetrain.data.tokenizer import EOS_ID, PAD_ID
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, build_model, make_setup
from moetrain.steps import make_eval_step

SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.eval_batches=2']


def saved(tmp_path):
  config = config_lib.load('configs/tiny.py', SMALL)
  _, params, buffers = nnx.split(build_model(config.model, 3), nnx.Param, ...)
  pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(tmp_path / 'ckpt', pure(params), pure(buffers), config)
  return tmp_path / 'ckpt', config


def one_device_loss(directory, config, num_batches):
  """Cross-entropy per target token of `moetrain.load`'s model (one device) on the batches."""
  graphdef, state = nnx.split(moetrain.load(directory)[0])

  @jax.jit
  def forward(state, inputs):
    segments, positions = document_segments(inputs, EOS_ID)
    return nnx.merge(graphdef, state).forward(inputs, segments_BxL=segments,
                                              positions_BxL=positions)[0]
  batches = fixed_batches(config, load_tokenizer(config), 'eval', num_batches,
                          range(config.train.batch_size))
  total = count = 0.0
  for batch in batches:
    logits = forward(state, jnp.asarray(batch['inputs']))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    weights = batch['targets'] != PAD_ID
    total, count = total + float((ce * weights).sum()), count + float(weights.sum())
  return total / count, count


def test_loss_equals_the_models_cross_entropy_on_the_same_batches(tmp_path):
  directory, config = saved(tmp_path)
  result = evaluate.evaluate(directory)
  loss, count = one_device_loss(directory, config, 2)
  assert math.isclose(result['loss'], loss, rel_tol=1e-5)
  assert result['perplexity'] == math.exp(result['loss']) and result['tokens'] == count
  assert abs(result['loss'] - math.log(8000)) < 0.1  # an untrained model is nearly uniform


def test_command_line_prints_the_routing_and_the_result_and_refuses_bad_input(tmp_path, capsys):
  directory, _ = saved(tmp_path)
  assert evaluate.main(['--checkpoint', str(directory), '--batches', '1']) == 0
  routing, result = capsys.readouterr().out.strip().splitlines()
  assert routing == ('routing: top-2 of 4 experts, dropless; the periodic eval in training used '
                     'model.moe.eval_capacity_factor=2.0, so its loss can differ (pass '
                     '--config.model.moe.eval_capacity_factor=2.0 to match it)')
  assert 'perplexity' in result
  assert evaluate.main(['--checkpoint', str(tmp_path / 'nothing')]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and 'nothing' in error[0]
  assert evaluate.main(['--checkpoint', str(directory), '--bogus']) == 2
  assert '--bogus' in capsys.readouterr().err
  assert evaluate.main(['--checkpoint', str(directory), '--batches', '-1']) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      'moetrain: error: --batches -1: must be >= 1, or 0 for train.eval_batches']


def test_an_eval_capacity_factor_override_routes_as_the_periodic_eval(tmp_path):
  """With capacity for an eighth of the tokens per expert, most choices are dropped: the loss is
  not the dropless one, and the routing line says so."""
  directory, _ = saved(tmp_path)
  dropless = evaluate.evaluate(directory, num_batches=1)
  capped = evaluate.evaluate(directory, num_batches=1,
                             overrides=['--config.model.moe.eval_capacity_factor=0.25'])
  assert capped['routing'] == (
      "routing: top-2 of 4 experts, eval capacity factor 0.25 (tokens over an expert's "
      'capacity are dropped); the periodic eval in training used '
      'model.moe.eval_capacity_factor=2.0, so its loss can differ (pass '
      '--config.model.moe.eval_capacity_factor=2.0 to match it)')
  # Untrained experts add little to the residual stream, so dropping most moves the loss little,
  # but well beyond float noise.
  assert abs(capped['loss'] - dropless['loss']) > 1e-5


def test_routing_line_says_when_it_matches_the_periodic_eval():
  moe = config_lib.default_config().model.moe
  assert evaluate.routing(moe, 2.0) == (
      "routing: top-2 of 8 experts, eval capacity factor 2.0 (tokens over an expert's capacity "
      'are dropped), as the periodic eval in training')
  moe.eval_capacity_factor = 0.0
  assert evaluate.routing(moe, 0.0) == ('routing: top-2 of 8 experts, dropless, as the periodic '
                                        'eval in training')
  moe.router = 'expert_choice'
  assert evaluate.routing(moe, 0.0).startswith(
      'routing: expert choice among 8 experts, capacity factor 0.0 (every expert takes every '
      'token)')



def test_an_expert_parallel_mesh_runs_the_exchange_and_equals_one_device(tmp_path):
  """evaluate on 8 devices with the experts split eight ways: the loss is the one-device
  model's, and the eval step it compiles exchanges tokens with all_to_all."""
  config = config_lib.load('configs/tiny.py', SMALL + ['--config.model.moe.num_experts=8'])
  _, params, buffers = nnx.split(build_model(config.model, 5), nnx.Param, ...)
  pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(tmp_path / 'ckpt', pure(params), pure(buffers), config)
  expert_parallel = ['--config.mesh.data=1', '--config.mesh.expert=8']

  result = evaluate.evaluate(tmp_path / 'ckpt', num_batches=1, overrides=expert_parallel)
  assert math.isclose(result['loss'], one_device_loss(tmp_path / 'ckpt', config, 1)[0],
                      rel_tol=1e-5)

  # The step evaluate compiled, for the same config and mesh.
  for flag in expert_parallel:
    config_lib.apply_override(config, flag)
  config.model.moe.eval_capacity_factor = 0.0
  setup = make_setup(config, make_mesh(config))
  assert setup.mesh.shape['expert'] == 8
  abstract = abstract_state(setup)
  batch = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=setup.batch_sharding)
  hlo = make_eval_step(setup).lower(abstract['params'], abstract['buffers'],
                                    {'inputs': batch, 'targets': batch}).compile().as_text()
  assert 'all-to-all' in hlo
