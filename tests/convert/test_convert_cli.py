"""tools/convert_checkpoint.py, run in-process: bad input is refused with exit status 2 and one
line on stderr that names the culprit, having written nothing; upcycling through the command line
starts equal to the dense model."""

import importlib.util
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from flax import nnx

import moetrain
from moetrain import checkpoint
from moetrain.convert import hf
from tests.convert import test_hf
from tests.convert.test_hf import _hf_model

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

_SPEC = importlib.util.spec_from_file_location(
    'convert_checkpoint', pathlib.Path(__file__).resolve().parents[2] / 'tools'
    / 'convert_checkpoint.py')
TOOL = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(TOOL)

PREFIX = 'convert_checkpoint: error: '
SUPPORTED = ('llama', 'mistral', 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3')
TOKENS = np.random.default_rng(1).integers(0, test_hf.COMMON['vocab_size'], (2, 16))


def _logits(checkpoint_dir) -> np.ndarray:
  """`moetrain.load(checkpoint_dir)`'s logits on TOKENS (jitted: eager MoE layers are slow)."""
  model, _ = moetrain.load(checkpoint_dir)
  return np.asarray(nnx.jit(lambda model, tokens: model(tokens))(model, TOKENS))


def _run(capsys, *argv):
  """(exit status, stdout, stderr) of the tool run in-process on `argv`."""
  capsys.readouterr()  # what earlier set-up printed
  code = TOOL.main([str(arg) for arg in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _refusal(capsys, *argv) -> str:
  """Runs the tool on bad input; asserts exit status 2 and exactly one error line on stderr
  and returns that line's message."""
  code, out, err = _run(capsys, *argv)
  assert code == 2, (out, err)
  assert err.startswith(PREFIX) and err.count('\n') == 1 and '\r' not in err, err
  return err[len(PREFIX):].strip()


def _listing(folder: pathlib.Path) -> dict:
  """Every path under `folder` (hidden staging folders included) with its size and mtime."""
  return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in folder.rglob('*')}


def _copy(folder: pathlib.Path, to: pathlib.Path, **config_changes) -> pathlib.Path:
  """A copy of a Hugging Face folder with `config.json` keys replaced."""
  shutil.copytree(folder, to)
  config = json.loads((to / 'config.json').read_text())
  (to / 'config.json').write_text(json.dumps({**config, **config_changes}))
  return to


def _moe_config_file(path: pathlib.Path, dense_dir) -> pathlib.Path:
  """A configs/*.py file: the dense model's shape (read from its checkpoint) as a 4-expert
  top-2 MoE with renormalised gates."""
  m = checkpoint.model_config(dense_dir).model
  copied = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
            'd_ff', 'max_seq_len', 'rope_theta', 'norm_eps', 'tie_embeddings', 'dtype',
            'param_dtype')
  path.write_text('\n'.join([
      '"""The converted dense Llama\'s shape, as a mixture of experts."""', '',
      'from moetrain.config import default_config', '', '',
      'def get_config():',
      '  config = default_config()',
      '  m = config.model',
      *[f'  m.{field} = {m[field]!r}' for field in copied],
      '  m.moe.num_experts, m.moe.top_k, m.moe.norm_topk_prob = 4, 2, True',
      '  config.train.seq_len = 16',
      '  config.train.batch_size = 8  # divides over any test mesh of up to 8 devices',
      '  return config', '']))
  return path


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(model, folder) of a tiny random transformers Llama saved as one safetensors file."""
  folder = tmp_path_factory.mktemp('llama') / 'hf'
  return _hf_model('llama', folder), folder


@pytest.fixture(scope='module')
def dense(llama, tmp_path_factory):
  """The tiny Llama converted to a moetrain checkpoint by the tool."""
  out = tmp_path_factory.mktemp('dense') / 'moetrain'
  assert TOOL.main(['hf-to-moetrain', str(llama[1]), str(out)]) == 0
  return out


@pytest.fixture(scope='module')
def dense_logits(dense):
  return _logits(dense)


@pytest.mark.parametrize('command, words', [
    ([], ['hf-to-moetrain', 'moetrain-to-hf', 'upcycle']),
    (['hf-to-moetrain'], ['hf_dir', 'out_dir', 'safetensors']),
    (['moetrain-to-hf'], ['checkpoint_dir', 'out_dir', '--family', '--max-shard-gb']),
    (['upcycle'], ['--from', '--config', 'out_dir', 'granular']),
])
def test_help_exits_zero_and_lists_the_arguments(command, words, capsys):
  with pytest.raises(SystemExit) as exit_info:
    TOOL.main([*command, '--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: convert_checkpoint')
  for word in words:
    assert word in out, (word, out)


def test_hf_to_moetrain_writes_a_checkpoint_with_the_transformers_logits(llama, tmp_path,
                                                                          capsys):
  """The happy path the refusals below depart from; stdout says what was written."""
  code, out, err = _run(capsys, 'hf-to-moetrain', llama[1], tmp_path / 'out')
  assert code == 0, err
  assert out == f'wrote {tmp_path / "out"}: 2 layers, no experts\n'
  with torch.no_grad():
    expected = llama[0](torch.tensor(TOKENS)).logits.numpy()
  assert np.abs(_logits(tmp_path / 'out') - expected).max() <= 1e-4


def test_unsupported_architecture_names_itself_and_lists_the_supported_ones(llama, tmp_path,
                                                                           capsys):
  source = _copy(llama[1], tmp_path / 'gpt2', model_type='gpt2',
                 architectures=['GPT2LMHeadModel'])
  before = _listing(tmp_path)
  message = _refusal(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert "'gpt2'" in message and str(source) in message
  for family in SUPPORTED:
    assert re.search(rf'\b{family}\b', message), (family, message)
  assert _listing(tmp_path) == before  # no OUT_DIR, no hidden staging folder next to it


def test_a_refusal_prints_nothing_but_its_one_line(llama, tmp_path, capsys):
  """The module docstring: 'Bad input prints one line and exits with status 2'."""
  source = _copy(llama[1], tmp_path / 'gpt2', model_type='gpt2')
  code, _, err = _run(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert code == 2
  assert err.startswith(PREFIX) and err.count('\n') == 1 and '\r' not in err, err


def test_tensor_of_the_wrong_shape_is_named(llama, tmp_path, capsys):
  source = _copy(llama[1], tmp_path / 'hf')
  tensors = safetensors_numpy.load_file(source / 'model.safetensors')
  name = 'model.layers.1.self_attn.q_proj.weight'
  tensors[name] = tensors[name][:-1]
  safetensors_numpy.save_file(tensors, source / 'model.safetensors', metadata={'format': 'pt'})
  before = _listing(tmp_path)
  message = _refusal(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert name in message and '[31, 32]' in message
  assert _listing(tmp_path) == before


def test_missing_shard_file_is_named(llama, tmp_path, capsys):
  source = tmp_path / 'sharded'
  llama[0].save_pretrained(source, max_shard_size='20KB')
  shards = sorted(source.glob('model-*-of-*.safetensors'))
  assert len(shards) >= 3
  shards[1].unlink()
  before = _listing(tmp_path)
  message = _refusal(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert str(shards[1]) in message and 'missing' in message
  assert _listing(tmp_path) == before


def test_pickle_checkpoint_is_refused_because_safetensors_is_required(llama, tmp_path, capsys):
  source = tmp_path / 'pickled'
  source.mkdir()
  torch.save(llama[0].state_dict(), source / 'pytorch_model.bin')
  shutil.copy(llama[1] / 'config.json', source)
  before = _listing(tmp_path)
  message = _refusal(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert 'pytorch_model.bin' in message and 'safetensors is required' in message
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('changes, key', [
    ({'attention_bias': True}, 'attention_bias'),
    ({'model_type': 'mistral', 'architectures': ['MistralForCausalLM'], 'sliding_window': 16},
     'sliding_window'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
])
def test_unsupported_config_feature_is_named(changes, key, llama, tmp_path, capsys):
  source = _copy(llama[1], tmp_path / 'hf', **changes)
  before = _listing(tmp_path)
  message = _refusal(capsys, 'hf-to-moetrain', source, tmp_path / 'out')
  assert f'{source / "config.json"}: {key}=' in message and 'not supported' in message
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('command', ['hf-to-moetrain', 'moetrain-to-hf'])
def test_existing_nonempty_output_is_named_and_left_untouched(command, llama, dense, tmp_path,
                                                              capsys):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  before = _listing(tmp_path)
  source = llama[1] if command == 'hf-to-moetrain' else dense
  message = _refusal(capsys, command, source, out)
  assert str(out) in message and 'not an empty directory' in message
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('command', ['hf-to-moetrain', 'upcycle'])
def test_output_path_that_is_a_file_is_named(command, llama, dense, tmp_path, capsys):
  out = tmp_path / 'out'
  out.write_text('mine')
  argv = ([llama[1]] if command == 'hf-to-moetrain' else
          ['--from', dense, '--config', _moe_config_file(tmp_path / 'moe.py', dense)])
  before = _listing(tmp_path)
  message = _refusal(capsys, command, *argv, out)
  assert str(out) in message
  assert _listing(tmp_path) == before and out.read_text() == 'mine'


def test_family_that_cannot_express_the_checkpoint_names_the_field(tmp_path, capsys):
  _hf_model('qwen2_moe', tmp_path / 'hf')
  hf.hf_to_moetrain(tmp_path / 'hf', tmp_path / 'qwen')  # one shared expert
  before = _listing(tmp_path)
  message = _refusal(capsys, 'moetrain-to-hf', tmp_path / 'qwen', tmp_path / 'out',
                     '--family', 'mixtral')
  assert 'model.moe.num_shared_experts=1' in message and 'mixtral' in message
  message = _refusal(capsys, 'moetrain-to-hf', tmp_path / 'qwen', tmp_path / 'out',
                     '--family', 'gpt2')
  assert '--family gpt2' in message and all(family in message for family in SUPPORTED)
  assert _listing(tmp_path) == before


def test_dense_checkpoint_is_refused_as_an_moe_family(dense, tmp_path, capsys):
  message = _refusal(capsys, 'moetrain-to-hf', dense, tmp_path / 'out', '--family', 'mixtral')
  assert 'model.moe.num_experts=0' in message
  assert not (tmp_path / 'out').exists()


def test_directory_that_is_no_moetrain_checkpoint_is_named(llama, tmp_path, capsys):
  before = _listing(tmp_path)
  message = _refusal(capsys, 'moetrain-to-hf', llama[1], tmp_path / 'out')
  assert str(llama[1]) in message and 'no moetrain checkpoint' in message
  message = _refusal(capsys, 'moetrain-to-hf', tmp_path / 'nowhere', tmp_path / 'out')
  assert str(tmp_path / 'nowhere') in message
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('argv, flag', [
    (['hf-to-moetrain', 'A', 'B', '--bogus'], '--bogus'),
    (['moetrain-to-hf', 'A', 'B', '--bogus=3'], '--bogus'),
    (['upcycle', '--from', 'A', '--config', 'c.py', 'B', '--configs.seed=1'], '--configs.seed'),
    (['upcycle', 'B'], '--from'),
])
def test_unknown_or_missing_argument_is_named(argv, flag, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  message = _refusal(capsys, *argv)
  assert flag in message
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('overrides, experts, d_expert', [
    ([], 4, 0),  # copy: every expert the dense MLP
    (['--config.init.upcycle=granular', '--config.model.moe.d_expert=12',
      '--config.model.moe.num_experts=8', '--config.model.moe.top_k=4'], 8, 12),
])
def test_upcycled_checkpoint_starts_with_the_dense_logits(overrides, experts, d_expert, dense,
                                                          dense_logits, tmp_path, capsys):
  config_file = _moe_config_file(tmp_path / 'moe.py', dense)
  out = tmp_path / 'moe'
  code, stdout, err = _run(capsys, 'upcycle', '--from', dense, '--config', config_file, out,
                           *overrides)
  assert code == 0, err
  assert stdout.startswith(f'wrote {out}: ') and f'into {experts} experts' in stdout
  moe = checkpoint.model_config(out).model.moe
  assert (moe.num_experts, moe.d_expert) == (experts, d_expert)
  assert np.abs(_logits(out) - dense_logits).max() <= 1e-5


def test_upcycle_refusals_name_the_parameter_or_directory(dense, tmp_path, capsys,
                                                          monkeypatch):
  config_file = _moe_config_file(tmp_path / 'moe.py', dense)
  monkeypatch.setitem(test_hf.FAMILIES, 'llama_wide', ('LlamaConfig', dict(hidden_size=48)))
  _hf_model('llama_wide', tmp_path / 'wide_hf')
  hf.hf_to_moetrain(tmp_path / 'wide_hf', tmp_path / 'wide')
  before = _listing(tmp_path)
  out = tmp_path / 'moe'
  message = _refusal(capsys, 'upcycle', '--from', tmp_path / 'wide', '--config', config_file,
                     out)
  assert re.search(r'parameter \S+: the dense model has shape \(.*48.*\), the MoE model '
                   r'expects \(.*32.*\)', message), message
  message = _refusal(capsys, 'upcycle', '--from', tmp_path / 'nowhere', '--config',
                     config_file, out)
  assert f'init.upcycle_from={tmp_path / "nowhere"}' in message
  assert _listing(tmp_path) == before
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  before = _listing(tmp_path)
  message = _refusal(capsys, 'upcycle', '--from', dense, '--config', config_file, out)
  assert str(out) in message and 'not an empty directory' in message
  assert _listing(tmp_path) == before
