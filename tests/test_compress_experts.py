"""tools/compress_experts.py: pruning and merging experts of a checkpoint (docs/compress.md)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moetrain
from moetrain import checkpoint, compress, evaluate
from moetrain import config as config_lib
from moetrain.errors import ConfigError
from moetrain.models import layout
from moetrain.state import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.train.batch_size=8', '--config.train.seq_len=32',
         '--config.train.eval_batches=2', '--config.train.sample_tokens=0',
         '--config.train.eval_every=0', '--config.train.warmup_steps=1']


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compress_experts = _tool('compress_experts')
convert_checkpoint = _tool('convert_checkpoint')


def _train(workdir, steps, *extra):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
      [sys.executable, '-m', 'moetrain.train', '--config', 'configs/tiny.py', '--workdir',
       str(workdir), f'--config.train.steps={steps}', *SMALL, *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny 8-expert top-2 model trained for a few steps."""
  workdir = tmp_path_factory.mktemp('compress') / 'run'
  _train(workdir, 4)
  return workdir


def _flat(directory):
  """(model config, flat params, flat buffers) of a checkpoint, as numpy arrays."""
  model, config = moetrain.load(directory)
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  host = lambda tree: layout.to_layers(jax.tree.map(np.array, nnx.to_pure_dict(tree)),
                                       config.model)
  return config, host(params), host(buffers)


def _save(directory, config, params, buffers):
  checkpoint.save_model(directory, layout.from_layers(params, config.model),
                        layout.from_layers(buffers, config.model), config)


def _logits(directory, tokens):
  model, _ = moetrain.load(directory)
  return np.asarray(model(jnp.asarray(tokens)))


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(3, 8000, (4, 32))


def _compress(capsys, *argv):
  status = compress_experts.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def test_prune_to_6_of_8_by_frequency_keeps_the_most_used_and_trains_on(trained, tmp_path,
                                                                       capsys):
  out = tmp_path / 'pruned'
  status, printed, err = _compress(capsys, 'prune', trained, out, '--keep', 6, '--batches', 2,
                                   '--skip-ratio', 0.3)
  assert status == 0, err
  assert 'eval loss (dropless) before' in printed and ', after ' in printed
  config, params, buffers = _flat(trained)
  stats = compress_experts.calibration(*compress_experts.restored(trained), 2)
  new_config, new_params, _ = _flat(out)
  assert new_config.model.moe.num_experts == 6 and new_config.model.moe.skip_ratio == 0.3
  for layer, frequency_E in zip(compress.moe_layers(params), stats['frequency']):
    kept = np.sort(np.argsort(-frequency_E, kind='stable')[:6])
    for name in ('router', 'w_gate', 'w_down'):
      old, new = params[f'blocks/{layer}/ffn/{name}'], new_params[f'blocks/{layer}/ffn/{name}']
      np.testing.assert_array_equal(new, old[:, kept] if name == 'router' else old[kept])
  after = float(printed.split(', after ')[1].split()[0])
  assert abs(evaluate.evaluate(out)['loss'] - after) < 1e-4
  # It trains on, and converts to Hugging Face like any other checkpoint, which computes every
  # choice: the conversion says so.
  _train(tmp_path / 'again', 2, f'--config.init.from_checkpoint={out}',
         '--config.model.moe.num_experts=6')
  capsys.readouterr()
  assert convert_checkpoint.main(['moetrain-to-hf', str(out), str(tmp_path / 'hf')]) == 0
  assert 'model.moe.skip_ratio=0.3: Hugging Face models compute every' in capsys.readouterr().out
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_config['num_local_experts'] == 6


def test_pruning_an_expert_never_routed_to_leaves_the_logits_equal(tmp_path, capsys):
  config = config_lib.load('configs/tiny.py', SMALL + ['--config.model.moe.bias_update_rate=1e-3'])
  _, params, buffers = nnx.split(build_model(config.model, 5), nnx.Param, ...)
  flat = lambda tree: layout.to_layers(jax.tree.map(np.array, nnx.to_pure_dict(tree)),
                                       config.model)
  params, buffers = flat(params), flat(buffers)
  for layer in compress.moe_layers(params):
    buffers[f'blocks/{layer}/ffn/router_bias'][3] = -1e4  # never among any token's top 2
  _save(tmp_path / 'full', config, params, buffers)
  stats = compress_experts.calibration(*compress_experts.restored(tmp_path / 'full'), 2)
  assert np.all(stats['frequency'][:, 3] == 0)
  status, _, err = _compress(capsys, 'prune', tmp_path / 'full', tmp_path / 'pruned',
                             '--keep', 7, '--batches', 2)
  assert status == 0, err
  pruned, pruned_params, _ = _flat(tmp_path / 'pruned')
  assert pruned.model.moe.num_experts == 7
  assert pruned_params['blocks/0/ffn/w_up'].shape[0] == 7
  np.testing.assert_allclose(_logits(tmp_path / 'pruned', _tokens()),
                             _logits(tmp_path / 'full', _tokens()), rtol=0, atol=1e-6)


def test_merging_two_exact_copies_keeps_the_logits_through_the_router_map(trained, tmp_path,
                                                                          capsys):
  config, params, buffers = _flat(trained)
  for layer in compress.moe_layers(params):
    prefix = f'blocks/{layer}/ffn/'
    for name in compress.EXPERT_NAMES:
      params[prefix + name][5] = params[prefix + name][2]
    params[prefix + 'router'][:, 5] = params[prefix + 'router'][:, 2]
  _save(tmp_path / 'copies', config, params, buffers)
  # Without a map the tokens that chose both copies would change: they do exist.
  without = {name: array.copy() for name, array in params.items()}
  for layer in compress.moe_layers(params):
    compress.prune_layer(without, {}, layer, np.array([0, 1, 2, 3, 4, 6, 7]), 8)
  no_map = config.copy_and_resolve_references()
  no_map.model.moe.num_experts = 7
  _save(tmp_path / 'no_map', no_map, without, buffers)
  tokens = _tokens(1)
  copies = _logits(tmp_path / 'copies', tokens)
  assert np.max(np.abs(_logits(tmp_path / 'no_map', tokens) - copies)) > 1e-4

  # On an FSDP mesh: the experts are merged where they are sharded.
  status, printed, err = _compress(capsys, 'merge', tmp_path / 'copies', tmp_path / 'merged',
                                   '--keep', 7, '--batches', 2, '--config.mesh.fsdp=2')
  assert status == 0, err
  assert 'groups [[2, 5]] merged' in printed
  merged, _, merged_buffers = _flat(tmp_path / 'merged')
  assert (merged.model.moe.num_experts, merged.model.moe.router_outputs) == (7, 8)
  np.testing.assert_array_equal(merged_buffers['blocks/0/ffn/expert_map'],
                                [0, 1, 2, 3, 4, 2, 5, 6])
  np.testing.assert_allclose(_logits(tmp_path / 'merged', tokens), copies, rtol=0, atol=1e-5)
  # It trains on, its map carried through the run as a buffer.
  _train(tmp_path / 'again', 1, f'--config.init.from_checkpoint={tmp_path / "merged"}',
         '--config.model.moe.num_experts=7', '--config.model.moe.router_outputs=8')
  np.testing.assert_array_equal(_flat(tmp_path / 'again')[2]['blocks/1/ffn/expert_map'],
                                merged_buffers['blocks/1/ffn/expert_map'])
  # Hugging Face has no router map: the export expands it, and converts back to the same model.
  assert convert_checkpoint.main(['moetrain-to-hf', str(tmp_path / 'merged'),
                                  str(tmp_path / 'hf')]) == 0
  assert 'Hugging Face has no router map' in capsys.readouterr().out
  assert convert_checkpoint.main(['hf-to-moetrain', str(tmp_path / 'hf'),
                                  str(tmp_path / 'back')]) == 0
  np.testing.assert_allclose(_logits(tmp_path / 'back', tokens), copies, rtol=0, atol=1e-5)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, capsys):
  config = config_lib.load('configs/tiny.py', SMALL + ['--config.model.moe.num_experts=0'])
  _, params, buffers = nnx.split(build_model(config.model, 0), nnx.Param, ...)
  pure = lambda tree: jax.tree.map(np.asarray, nnx.to_pure_dict(tree))
  checkpoint.save_model(tmp_path / 'dense', pure(params), pure(buffers), config)
  out = tmp_path / 'out'
  cases = [
      (['prune', trained, out, '--keep', 0], '--keep 0: must be between 2 and'),
      (['prune', trained, out, '--keep', 9], '--keep 9: must be between 2 and'),
      (['merge', trained, out, '--keep', 9], 'model.moe.num_experts=8'),
      (['merge', tmp_path / 'dense', out, '--keep', 2], 'a dense model'),
      (['prune', tmp_path / 'missing', out, '--keep', 6], 'no moetrain checkpoint there'),
      (['prune', trained, out, '--keep', 6, '--bogus'], 'unknown argument --bogus'),
      (['prune', trained, out, '--min-mass', 1.5], '--min-mass 1.5'),
      (['merge', trained, out, '--keep', 7, '--config.mesh.expert=2'],
       'model.moe.num_experts=7 must be divisible by mesh.expert=2'),
  ]
  for argv, expected in cases:
    status, printed, err = _compress(capsys, *argv)
    assert status == 2 and printed == '', argv
    assert err.startswith('compress_experts: error: ') and err.count('\n') == 1, err
    assert expected in err, err
    assert not out.exists()


@pytest.mark.parametrize('overrides, field', [
    (['--config.model.moe.router_outputs=6'], 'model.moe.router_outputs=6 must be >='),
    (['--config.model.moe.router_outputs=12', '--config.model.moe.num_null_experts=1'],
     'model.moe.router_outputs=12 (merged experts) needs top-k routing'),
    (['--config.model.moe.skip_ratio=1.0'], 'model.moe.skip_ratio=1.0 must be < 1'),
])
def test_config_checks_name_the_compression_fields(overrides, field):
  with pytest.raises(ConfigError, match=re.escape(field)):
    config_lib.load('configs/tiny.py', overrides)


def test_mass_counts_and_clusters_of_the_pure_functions():
  assert compress.count_for_mass(np.array([0.1, 0.6, 0.3, 0.0]), 0.9) == 2
  assert compress.count_for_mass(np.array([0.1, 0.6, 0.3, 0.0]), 1.0) == 3
  np.testing.assert_array_equal(compress.top_experts(np.array([3, 1, 3, 2]), 2), [0, 2])
  features = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 1.0]])
  np.testing.assert_array_equal(compress.cluster(compress.cosine_similarity(features), 2),
                                [0, 1, 0, 1])
  merged = compress.merge_weights(np.arange(4.0).reshape(4, 1, 1), np.array([0, 1, 0, 1]),
                                  np.array([1.0, 1.0, 3.0, 0.0]))
  np.testing.assert_allclose(merged[:, 0, 0], [(0 + 3 * 2) / 4, 1.0])
