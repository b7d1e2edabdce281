"""Sampling: cached decoding equals recomputing the whole prefix; top-p; the command line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import checkpoint, generate
from moetrain import config as config_lib
from moetrain.models.transformer import Transformer
from moetrain.parallel.mesh import make_mesh
from moetrain.state import init_state, make_setup


def model_config(router='softmax', attention='mha', scan=False):
  config = config_lib.default_config().model
  config.vocab_size, config.d_model, config.num_layers, config.d_ff = 32, 16, 2, 32
  config.num_heads = config.num_kv_heads = 2
  config.moe.num_experts, config.moe.router = 4, router
  config.attention, config.scan_layers = attention, scan
  config.q_lora_rank, config.kv_lora_rank = 8, 8
  config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim = 8, 4, 6
  return config


@pytest.mark.parametrize('attention,scan', [('mha', False), ('mla', True)])
def test_cached_greedy_generation_equals_recomputing_the_prefix(attention, scan):
  model = Transformer(model_config(attention=attention, scan=scan), rngs=nnx.Rngs(0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  prompt = [5, 9, 2]
  new = generate.generate(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers),
                          prompt, num_tokens=5)
  # The whole prefix recomputed without a cache at every step. The model is causal, so a
  # fixed-length row (one compiled forward) with zeros after the prefix gives its logits.
  forward = jax.jit(lambda state, row: nnx.merge(graphdef, state)(row))
  state = nnx.state(model)
  row = np.zeros((1, len(prompt) + 5), np.int32)
  row[0, :len(prompt)] = prompt
  for length in range(len(prompt), len(prompt) + 5):
    row[0, length] = int(jnp.argmax(forward(state, row)[0, length - 1]))
  assert new == row[0, len(prompt):].tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  draws = {int(generate.choose(logits, jax.random.key(i), 1.0, 0.7)) for i in range(200)}
  assert draws == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3
  assert {int(generate.choose(logits, jax.random.key(i), 1.0, 0.1)) for i in range(50)} == {0}


def test_command_line_streams_a_continuation_and_refuses_bad_input(tmp_path, capsys):
  config = config_lib.load('configs/tiny.py', ['--config.model.d_model=32',
                                               '--config.model.d_ff=64',
                                               '--config.model.num_layers=2'])
  _, params, buffers = nnx.split(Transformer(config.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
  pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(tmp_path / 'ckpt', pure(params), pure(buffers), config)
  assert generate.main(['--checkpoint', str(tmp_path / 'ckpt'), '--prompt', 'def f(',
                        '--max_tokens', '8', '--temperature', '0.8', '--top_p', '0.9']) == 0
  out = capsys.readouterr().out
  assert out.startswith('def f(') and len(out) > len('def f(\n')
  assert generate.main(['--checkpoint', str(tmp_path / 'ckpt'), '--prompt', 'x',
                        '--max_tokens', '100000']) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and 'max_seq_len' in error[0]


@pytest.mark.parametrize('flags, message', [
    (['--prompt', ''], '--prompt is empty: give the text to continue (at least one character)'),
    (['--max_tokens', '0'], '--max_tokens 0: must be >= 1'),
    (['--max_tokens', '-1'], '--max_tokens -1: must be >= 1'),
    (['--temperature', '-1'], '--temperature -1.0: must be a number >= 0 (0: greedy)'),
    (['--temperature', 'nan'], '--temperature nan: must be a number >= 0'),
    (['--top_p', '1.5'], '--top_p 1.5: must be > 0 and <= 1'),
    (['--top_p', '0'], '--top_p 0.0: must be > 0 and <= 1'),
    (['--max_tokens', 'many'], "argument --max_tokens: invalid int value: 'many'"),
])
def test_command_line_refuses_bad_settings_in_one_line_before_loading(tmp_path, capsys, flags,
                                                                      message):
  # The checkpoint does not exist: the flag, not the checkpoint, must be what is refused.
  argv = ['--checkpoint', str(tmp_path / 'nothing'), '--prompt', 'x', *flags]
  assert generate.main(argv) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(f'moetrain: error: {message}'), error


def test_command_line_without_a_checkpoint_names_the_flag(capsys):
  assert generate.main(['--prompt', 'x']) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert error == ['moetrain: error: the following arguments are required: --checkpoint']


def test_expert_choice_model_refuses_to_generate():
  model = Transformer(model_config('expert_choice'), rngs=nnx.Rngs(0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match='expert_choice looks at future tokens'):
    generate.generate(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), [1, 2], 3)


def test_a_model_trained_on_a_mesh_decodes_one_row():
  """The sample after training: weights of an expert-parallel run, whose exchange splits the
  batch over devices (a batch of one row cannot be), still decode, to the tokens of the same
  weights on one device."""
  config = config_lib.load('configs/tiny.py', ['--config.model.d_model=32',
                                               '--config.model.d_ff=64',
                                               '--config.model.num_layers=2',
                                               '--config.mesh.data=1', '--config.mesh.expert=2'])
  setup = make_setup(config, make_mesh(config, jax.devices()[:2]))
  state = init_state(setup)
  with pytest.raises(ValueError, match='shard_map'):  # the training graph cannot decode
    generate.generate(setup.graphdef, state['params'], state['buffers'], [5, 9], 1)
  graphdef = generate.decoding_graphdef(config.model)
  sharded = generate.generate(graphdef, state['params'], state['buffers'], [5, 9], 4)
  local = jax.device_get((state['params'], state['buffers']))
  assert sharded == generate.generate(graphdef, *local, [5, 9], 4)
