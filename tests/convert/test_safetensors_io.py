"""Hugging Face checkpoint folders: sharded round trips, refusals that name the culprit, and
DeepSeek-V3 FP8 dequantisation against a block-by-block reference."""

import json
import re

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

from moetrain.convert.safetensors_io import ConversionError, Reader, write_checkpoint
from moetrain.errors import ConfigError


def _tensors():
  rng = np.random.default_rng(0)
  return {
      'embed.weight': rng.standard_normal((16, 8)).astype(np.float32),
      'layers.0.mlp.weight': rng.standard_normal((8, 12)).astype(ml_dtypes.bfloat16),
      # a NaN payload and signed zero must survive too
      'layers.0.norm.weight': np.array([0x3f80, 0x7fc1, 0xff80, 0x8000], np.uint16).view(
          ml_dtypes.bfloat16),
      'layers.1.mlp.weight': rng.standard_normal((12, 8)).astype(np.float32).T,  # strided
      'positions': np.arange(10, dtype=np.int32),
  }


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _write(folder, tensors, **kwargs):
  write_checkpoint(folder, iter(tensors.items()), {'model_type': 'toy'}, **kwargs)


def test_sharded_round_trip_is_bit_exact(tmp_path):
  tensors, written = _tensors(), []
  _write(tmp_path / 'hf', tensors, max_shard_bytes=400, progress=written.append)
  files = sorted(path.name for path in (tmp_path / 'hf').iterdir())
  shards = [name for name in files if name.endswith('.safetensors')]
  assert len(shards) >= 3
  assert shards == [f'model-{i:05d}-of-{len(shards):05d}.safetensors'
                    for i in range(1, len(shards) + 1)]
  assert set(files) == set(shards) | {'model.safetensors.index.json', 'config.json'}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']  # no staging folder left
  index = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())
  assert sorted(index['weight_map']) == sorted(tensors)
  assert set(index['weight_map'].values()) == set(shards)
  assert index['metadata']['total_size'] == sum(t.nbytes for t in tensors.values())
  assert written == list(tensors)
  for shard in shards:  # transformers refuses files without this metadata
    with safetensors.safe_open(str(tmp_path / 'hf' / shard), framework='numpy') as file:
      assert file.metadata() == {'format': 'pt'}
  with Reader(tmp_path / 'hf', max_open=2) as reader:
    assert reader.names() == sorted(tensors)
    assert reader.config() == {'model_type': 'toy'}
    for name, tensor in tensors.items():
      assert reader.shape(name) == tensor.shape
      assert _same_bits(reader.get(name), tensor)
      assert _same_bits(reader.get_dequantized(name), tensor)
    assert reader.dtype_name('embed.weight') == 'F32'
    assert reader.dtype_name('layers.0.mlp.weight') == 'BF16'
    assert reader.dtype_name('positions') == 'I32'


def test_one_shard_writes_model_safetensors_alone(tmp_path):
  (tmp_path / 'hf').mkdir()  # an empty folder is fine to write into
  _write(tmp_path / 'hf', _tensors())
  assert sorted(p.name for p in (tmp_path / 'hf').iterdir()) == ['config.json',
                                                                  'model.safetensors']
  with Reader(tmp_path / 'hf') as reader:
    assert reader.names() == sorted(_tensors())


def test_files_load_in_torch(tmp_path):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file
  tensors = _tensors()
  _write(tmp_path / 'hf', tensors, max_shard_bytes=400)
  loaded = {}
  for path in sorted((tmp_path / 'hf').glob('*.safetensors')):
    loaded.update(load_file(path))
  assert sorted(loaded) == sorted(tensors)
  for name, tensor in tensors.items():
    value = loaded[name]
    if value.dtype == torch.bfloat16:
      assert _same_bits(value.view(torch.int16).numpy(), tensor.view(np.int16))
    else:
      assert _same_bits(value.numpy(), np.ascontiguousarray(tensor))


def _refused(pattern: str, call, *args):
  with pytest.raises(ConfigError, match=pattern) as info:  # ConversionError or ConfigError
    call(*args)
  assert '\n' not in str(info.value)  # the CLI prints it as one line


def test_refusals_name_the_culprit(tmp_path):
  assert issubclass(ConversionError, ConfigError)
  _refused(re.escape(str(tmp_path / 'nowhere')), Reader, tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  _refused(re.escape(str(tmp_path / 'empty')), Reader, tmp_path / 'empty')
  (tmp_path / 'pickled').mkdir()
  (tmp_path / 'pickled' / 'pytorch_model-00001-of-00002.bin').write_bytes(b'\x80\x04junk')
  (tmp_path / 'pickled' / 'consolidated.pth').write_bytes(b'\x80\x04junk')
  _refused('pickle.*safetensors is required.*arbitrary code', Reader, tmp_path / 'pickled')

  _write(tmp_path / 'sharded', _tensors(), max_shard_bytes=400)
  (tmp_path / 'sharded' / 'model-00002-of-00004.safetensors').unlink()
  _refused('model-00002-of-00004.safetensors', Reader, tmp_path / 'sharded')

  _write(tmp_path / 'one', _tensors())
  with Reader(tmp_path / 'one') as reader:
    _refused(r'no\.such\.tensor.*' + re.escape(str(tmp_path / 'one')), reader.get,
             'no.such.tensor')
    _refused(r'no\.such\.tensor', reader.shape, 'no.such.tensor')
  path = tmp_path / 'one' / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:-7])
  _refused(re.escape(str(path)), Reader, tmp_path / 'one')


def test_truncated_shard_is_named_when_first_read(tmp_path):
  _write(tmp_path / 'hf', _tensors(), max_shard_bytes=400)
  shard = tmp_path / 'hf' / 'model-00001-of-00004.safetensors'
  shard.write_bytes(shard.read_bytes()[:20])
  index = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())
  name = next(n for n, file in index['weight_map'].items() if file == shard.name)
  with Reader(tmp_path / 'hf') as reader:
    _refused(re.escape(str(shard)), reader.get, name)


def test_config_errors_name_the_file(tmp_path):
  _write(tmp_path / 'hf', {'x': np.zeros(2, np.float32)})
  config = tmp_path / 'hf' / 'config.json'
  config.write_text('{not json')
  with Reader(tmp_path / 'hf') as reader:
    _refused('config.json is not valid JSON', reader.config)
    config.unlink()
    _refused('config.json is missing', reader.config)


def test_existing_folder_is_untouched(tmp_path):
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'keep.txt').write_text('mine')
  _refused(re.escape(str(folder)), _write, folder, _tensors())
  assert [p.name for p in folder.iterdir()] == ['keep.txt']
  assert (folder / 'keep.txt').read_text() == 'mine'


def test_failure_midway_leaves_nothing(tmp_path):
  def tensors():
    yield from list(_tensors().items())[:3]
    raise RuntimeError('source broke')

  with pytest.raises(RuntimeError, match='source broke'):
    write_checkpoint(tmp_path / 'hf', tensors(), {}, max_shard_bytes=400)
  assert list(tmp_path.iterdir()) == []
  _refused('tensor a is written twice', write_checkpoint, tmp_path / 'hf',
           iter([('a', np.zeros(1))] * 2), {})
  assert list(tmp_path.iterdir()) == []


def _quantise(weight: np.ndarray, block: int = 128):
  rows, cols = -(-weight.shape[0] // block), -(-weight.shape[1] // block)
  scale = np.zeros((rows, cols), np.float32)
  quantised = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
  for i in range(rows):
    for j in range(cols):
      part = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
      scale[i, j] = np.abs(part).max() / 448
      quantised[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
          part / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return quantised, scale


def _reference_dequantise(quantised: np.ndarray, scale: np.ndarray, block: int = 128):
  out = np.zeros(quantised.shape, ml_dtypes.bfloat16)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
      out[rows, cols] = (quantised[rows, cols].astype(np.float32)
                         * scale[i, j]).astype(ml_dtypes.bfloat16)
  return out


def test_fp8_weights_are_dequantised_block_by_block(tmp_path):
  weight = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
  weight[:128, :128] *= 100  # blocks of different magnitude need different scales
  quantised, scale = _quantise(weight)
  (tmp_path / 'fp8').mkdir()
  save_file({'w.weight': quantised, 'w.weight_scale_inv': scale,
             'bad.weight': quantised, 'bad.weight_scale_inv': scale[:2]},
            str(tmp_path / 'fp8' / 'model.safetensors'), metadata={'format': 'pt'})
  with Reader(tmp_path / 'fp8') as reader:
    assert reader.dtype_name('w.weight') == 'F8_E4M3'
    assert _same_bits(reader.get('w.weight'), quantised)
    assert _same_bits(reader.get('w.weight_scale_inv'), scale)
    assert reader.is_auxiliary('w.weight_scale_inv') and not reader.is_auxiliary('w.weight')
    dequantised = reader.get_dequantized('w.weight')
    assert _same_bits(dequantised, _reference_dequantise(quantised, scale))
    assert _same_bits(reader.get_dequantized('w.weight', block_size=[128, 128]), dequantised)
    error = np.linalg.norm(dequantised.astype(np.float32) - weight) / np.linalg.norm(weight)
    assert error < 0.05
    _refused(r'bad\.weight_scale_inv.*bad\.weight', reader.get_dequantized, 'bad.weight')
