"""python -m moetrain.evaluate: loss and perplexity of a checkpoint, dropless."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moetrain
from moetrain import checkpoint, evaluate, train, trainer
from moetrain import config as config_lib
from moetrain.data.packing import document_segments
from moetrain.data.tokenizer import EOS_ID, PAD_ID

SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.eval_batches=2']


def saved(tmp_path):
  config = config_lib.load('configs/tiny.py', SMALL)
  _, params, buffers = nnx.split(trainer.build_model(config.model, 3), nnx.Param, ...)
  pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(tmp_path / 'ckpt', pure(params), pure(buffers), config)
  return tmp_path / 'ckpt', config


def test_loss_equals_the_models_cross_entropy_on_the_same_batches(tmp_path):
  directory, config = saved(tmp_path)
  result = evaluate.evaluate(directory)
  model, _ = moetrain.load(directory)
  batches = train.fixed_batches(config, train.load_tokenizer(config), 'eval', 2)
  total = count = 0.0
  for batch in batches:
    segments, positions = document_segments(jnp.asarray(batch['inputs']), EOS_ID)
    logits, _ = model.forward(jnp.asarray(batch['inputs']), segments_BxL=segments,
                              positions_BxL=positions)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    weights = batch['targets'] != PAD_ID
    total, count = total + float((ce * weights).sum()), count + float(weights.sum())
  assert math.isclose(result['loss'], total / count, rel_tol=1e-5)
  assert result['perplexity'] == math.exp(result['loss']) and result['tokens'] == count
  assert abs(result['loss'] - math.log(8000)) < 0.1  # an untrained model is nearly uniform


def test_command_line_prints_the_result_and_refuses_bad_input(tmp_path, capsys):
  directory, _ = saved(tmp_path)
  assert evaluate.main(['--checkpoint', str(directory), '--batches', '1']) == 0
  assert 'perplexity' in capsys.readouterr().out
  assert evaluate.main(['--checkpoint', str(tmp_path / 'nothing')]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and 'nothing' in error[0]
  assert evaluate.main(['--checkpoint', str(directory), '--bogus']) == 2
  assert '--bogus' in capsys.readouterr().err
