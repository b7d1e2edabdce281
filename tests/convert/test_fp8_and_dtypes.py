"""Conversion keeps every bit: DeepSeek-V3 FP8 weights dequantise exactly as the block-by-block
reference, bfloat16 checkpoints round-trip bitwise, sharded folders are read and written, and
deep models converted into the scanned layout still match transformers."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import moetrain
from moetrain import checkpoint
from moetrain.convert import hf
from moetrain.convert.safetensors_io import Reader
from moetrain.models import layout
from moetrain.pretrained import abstract_weights
from tests.convert import test_hf
from tests.convert.test_hf import _hf_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

TOKENS = np.random.default_rng(1).integers(0, test_hf.COMMON['vocab_size'], (2, 16))
BLOCK = 16  # weight_block_size of the FP8 test: the tiny matrices get several, some partial
QUANTIZATION = {'quant_method': 'fp8', 'fmt': 'e4m3', 'weight_block_size': [BLOCK, BLOCK],
                'activation_scheme': 'dynamic'}
E4M3_MAX = 448.0


def _logits(checkpoint_dir, compute_dtype=None) -> np.ndarray:
  """Logits on TOKENS of the model `moetrain.load(checkpoint_dir)` gives, optionally computing
  in another dtype (the weights as stored); jitted, as eager MoE layers are slow."""
  if compute_dtype is None:
    model, _ = moetrain.load(checkpoint_dir)
  else:
    config = checkpoint.model_config(checkpoint_dir)
    config.model.dtype = compute_dtype
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, params, buffers = abstract_weights(config.model, device)
    model = nnx.merge(graphdef, *checkpoint.restore_weights(checkpoint_dir, params, buffers))
  return np.asarray(nnx.jit(lambda model, tokens: model(tokens))(model, TOKENS))


def _hf_logits(folder) -> np.ndarray:
  """Logits on TOKENS of the transformers model in `folder`, loaded and run in float32."""
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _bf16_model(name, tmp_path):
  """A tiny random transformers model of test_hf's `name`, saved in bfloat16 to tmp/'hf'."""
  model = _hf_model(name, tmp_path / 'float32').to(torch.bfloat16)
  model.save_pretrained(tmp_path / 'hf')
  return tmp_path / 'hf'


def _tensors(folder) -> dict:
  with Reader(folder) as reader:
    return {name: reader.get(name) for name in reader.names()}


def _assert_same_tensors(folder, other) -> None:
  """Both Hugging Face folders hold the same tensor names with identical dtypes and bytes."""
  with Reader(folder) as a, Reader(other) as b:
    assert a.names() == b.names()
    for name in a.names():
      assert a.dtype_name(name) == b.dtype_name(name), name
      x, y = a.get(name), b.get(name)
      assert x.shape == y.shape and x.tobytes() == y.tobytes(), name


def _weights(checkpoint_dir) -> dict:
  """A moetrain checkpoint's params and buffers as host arrays under flat per-layer names."""
  config = checkpoint.model_config(checkpoint_dir)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  _, params, buffers = abstract_weights(config.model, cpu)
  params, buffers = checkpoint.restore_weights(checkpoint_dir, params, buffers)
  return {f'{kind}/{name}': np.asarray(value)
          for kind, tree in (('params', params), ('buffers', buffers))
          for name, value in layout.to_layers(tree, config.model).items()}


def _save_folder(folder, tensors: dict, config: dict):
  folder.mkdir()
  safetensors_numpy.save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  (folder / 'config.json').write_text(json.dumps(config))


def _blocks(shape):
  """Every [BLOCK, BLOCK] block of a matrix (the last ones may be partial), with its index."""
  for i in range(-(-shape[0] // BLOCK)):
    for j in range(-(-shape[1] // BLOCK)):
      yield (i, j), (slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK))


def _quantise(weight: np.ndarray):
  """DeepSeek-V3's FP8 format: float8_e4m3fn values and one float32 scale per block, whose
  largest magnitude maps to the format's maximum 448."""
  weight = weight.astype(np.float32)
  scale_inv = np.zeros((-(-weight.shape[0] // BLOCK), -(-weight.shape[1] // BLOCK)), np.float32)
  quantised = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
  for index, block in _blocks(weight.shape):
    scale_inv[index] = np.abs(weight[block]).max() / E4M3_MAX
    quantised[block] = (weight[block] / scale_inv[index]).astype(ml_dtypes.float8_e4m3fn)
  return quantised, scale_inv


def _reference(quantised: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
  """The slow obvious dequantisation: float32(block) × its scale, cast to bfloat16."""
  out = np.zeros(quantised.shape, ml_dtypes.bfloat16)
  for index, block in _blocks(quantised.shape):
    out[block] = (quantised[block].astype(np.float32) * scale_inv[index]).astype(
        ml_dtypes.bfloat16)
  return out


def _is_quantised_linear(name: str, value: np.ndarray) -> bool:
  """The 2-D attention and MLP projections DeepSeek-V3 stores in FP8 (the router stays)."""
  return (value.ndim == 2 and ('.self_attn.' in name or '.mlp.' in name)
          and name.endswith('.weight') and not name.endswith('.mlp.gate.weight'))


def test_deepseek_v3_fp8_weights_convert_to_the_block_by_block_reference(tmp_path):
  source = _bf16_model('deepseek_v3', tmp_path)
  config = json.loads((source / 'config.json').read_text())
  fp8, reference, quantised_names = {}, {}, []
  for name, value in _tensors(source).items():
    if _is_quantised_linear(name, value):
      fp8[name], fp8[name + '_scale_inv'] = _quantise(value)
      reference[name] = _reference(fp8[name], fp8[name + '_scale_inv'])
      quantised_names.append(name)
    else:
      fp8[name] = reference[name] = value
  # Several blocks per matrix, partial ones included (20 and 24 rows in blocks of 16).
  shapes = {fp8[name].shape for name in quantised_names}
  assert any(rows % BLOCK for rows, _ in shapes) and all(
      fp8[name + '_scale_inv'].size > 1 for name in quantised_names)
  _save_folder(tmp_path / 'fp8', fp8, {**config, 'quantization_config': QUANTIZATION})
  _save_folder(tmp_path / 'reference', reference, config)

  converted = hf.hf_to_moetrain(tmp_path / 'fp8', tmp_path / 'from_fp8', log=print)
  assert converted.model.param_dtype == 'bfloat16'
  hf.hf_to_moetrain(tmp_path / 'reference', tmp_path / 'from_reference', log=print)

  got, want = _weights(tmp_path / 'from_fp8'), _weights(tmp_path / 'from_reference')
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    assert got[name].tobytes() == want[name].tobytes(), name

  # The weights are the reference's bfloat16 values bit for bit; computed in float32 like the
  # transformers model (moetrain.load would compute in the checkpoint's bfloat16, where a token
  # near a tie between two experts may route differently), the logits agree to rounding.
  expected = _hf_logits(tmp_path / 'reference')
  assert np.abs(_logits(tmp_path / 'from_fp8', compute_dtype='float32') - expected).max() <= 1e-4


def _with_mtp_layer(tensors: dict, layers: int) -> dict:
  """`tensors` of a DeepSeek-V3 of `layers` layers plus one multi-token-prediction layer after
  them, as DeepSeek-V3 ships it: a decoder layer's tensors (the last layer's, perturbed), its
  norms and 2d → d projection, and copies of the embedding and the output head."""
  rng = np.random.default_rng(2)
  mtp, last = f'model.layers.{layers}', f'model.layers.{layers - 1}'
  out = dict(tensors)
  for name, value in tensors.items():
    if name.startswith(last + '.'):
      noise = 0.01 * rng.standard_normal(value.shape)
      out[mtp + name[len(last):]] = (value.astype(np.float32) + noise).astype(value.dtype)
  width = tensors['model.norm.weight'].shape[0]
  for name in ('enorm', 'hnorm', 'shared_head.norm'):
    out[f'{mtp}.{name}.weight'] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
  out[f'{mtp}.eh_proj.weight'] = 0.05 * rng.standard_normal((width, 2 * width)).astype(np.float32)
  out[f'{mtp}.embed_tokens.weight'] = tensors['model.embed_tokens.weight'].copy()
  out[f'{mtp}.shared_head.head.weight'] = tensors['lm_head.weight'].copy()
  return out


def test_deepseek_v3_multi_token_prediction_layer_converts_and_round_trips_bitwise(tmp_path):
  _hf_model('deepseek_v3', tmp_path / 'made')
  config = json.loads((tmp_path / 'made' / 'config.json').read_text())
  layers = config['num_hidden_layers']
  assert config['num_nextn_predict_layers'] == 1  # declared, but transformers saves none
  tensors = _with_mtp_layer(_tensors(tmp_path / 'made'), layers)
  _save_folder(tmp_path / 'hf', tensors, config)

  notices = []
  converted = hf.hf_to_moetrain(tmp_path / 'hf', tmp_path / 'moetrain', log=notices.append)
  assert converted.model.mtp_layers == 1 and not notices
  weights = _weights(tmp_path / 'moetrain')
  mtp = f'model.layers.{layers}'
  np.testing.assert_array_equal(weights['params/mtp/0/eh_proj'],
                                tensors[f'{mtp}.eh_proj.weight'].T)
  np.testing.assert_array_equal(weights['params/mtp/0/norm/scale'],
                                tensors[f'{mtp}.shared_head.norm.weight'])
  np.testing.assert_array_equal(weights[f'params/blocks/{layers}/ffn/w_down'][1],
                                tensors[f'{mtp}.mlp.experts.1.down_proj.weight'].T)
  np.testing.assert_array_equal(weights[f'buffers/blocks/{layers}/ffn/router_bias'],
                                tensors[f'{mtp}.mlp.gate.e_score_correction_bias'])

  hf.moetrain_to_hf(tmp_path / 'moetrain', tmp_path / 'back')
  _assert_same_tensors(tmp_path / 'hf', tmp_path / 'back')
  back = json.loads((tmp_path / 'back' / 'config.json').read_text())
  assert back['num_nextn_predict_layers'] == 1

  # The layer's copy of the output head must be the head: moetrain shares it.
  tensors[f'{mtp}.shared_head.head.weight'] = tensors[f'{mtp}.shared_head.head.weight'] * 2
  _save_folder(tmp_path / 'other_head', tensors, config)
  with pytest.raises(hf.ConversionError,
                     match=f'lm_head.weight differs from {mtp}.shared_head.head.weight'):
    hf.hf_to_moetrain(tmp_path / 'other_head', tmp_path / 'refused')
  assert not (tmp_path / 'refused').exists()
  # The declared layer without its tensors (as transformers saves): converted without it.
  hf.hf_to_moetrain(tmp_path / 'made', tmp_path / 'without', log=notices.append)
  assert len(notices) == 1 and 'declares 1 multi-token-prediction layer(s) but the checkpoint ' \
      'holds none' in notices[0]


def test_bfloat16_mixtral_round_trips_bitwise_and_stays_bfloat16(tmp_path):
  source = _bf16_model('mixtral', tmp_path)
  with Reader(source) as reader:
    assert {reader.dtype_name(name) for name in reader.names()} == {'BF16'}
  config = hf.hf_to_moetrain(source, tmp_path / 'moetrain')
  assert config.model.param_dtype == 'bfloat16'
  assert {value.dtype for value in _weights(tmp_path / 'moetrain').values()} == {
      np.dtype(ml_dtypes.bfloat16)}
  hf.moetrain_to_hf(tmp_path / 'moetrain', tmp_path / 'back')
  assert json.loads((tmp_path / 'back' / 'config.json').read_text())['dtype'] == 'bfloat16'
  _assert_same_tensors(source, tmp_path / 'back')


def test_sharded_checkpoints_are_read_and_written(tmp_path):
  model = _hf_model('llama', tmp_path / 'single')
  model.save_pretrained(tmp_path / 'hf', max_shard_size='20KB')
  assert len(list((tmp_path / 'hf').glob('model-*-of-*.safetensors'))) >= 3
  assert (tmp_path / 'hf' / 'model.safetensors.index.json').is_file()
  hf.hf_to_moetrain(tmp_path / 'hf', tmp_path / 'moetrain')

  hf.moetrain_to_hf(tmp_path / 'moetrain', tmp_path / 'back', max_shard_bytes=20_000)
  shards = sorted((tmp_path / 'back').glob('model-*-of-*.safetensors'))
  assert len(shards) >= 3 and all(shard.stat().st_size < 2 * 20_000 for shard in shards)
  index = json.loads((tmp_path / 'back' / 'model.safetensors.index.json').read_text())
  assert set(index['weight_map'].values()) == {shard.name for shard in shards}
  _assert_same_tensors(tmp_path / 'hf', tmp_path / 'back')
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'back', output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.tensor(TOKENS)).logits.numpy(),
                                  model(torch.tensor(TOKENS)).logits.numpy())


def test_deep_olmoe_converts_into_scanned_layers_and_back(tmp_path, monkeypatch):
  monkeypatch.setitem(test_hf.FAMILIES, 'olmoe_10_layers', ('OlmoeConfig', dict(
      num_experts=4, num_experts_per_tok=2, num_hidden_layers=10)))
  model = _hf_model('olmoe_10_layers', tmp_path / 'hf')
  config = hf.hf_to_moetrain(tmp_path / 'hf', tmp_path / 'moetrain')
  assert config.model.scan_layers and config.model.num_layers == 10
  _, params, _ = abstract_weights(config.model)
  assert 'moe_stack' in params and 'blocks' not in params  # stored stacked, not per layer
  with torch.no_grad():
    expected = model(torch.tensor(TOKENS)).logits.numpy()
  assert np.abs(_logits(tmp_path / 'moetrain') - expected).max() <= 1e-4
  hf.moetrain_to_hf(tmp_path / 'moetrain', tmp_path / 'back')
  _assert_same_tensors(tmp_path / 'hf', tmp_path / 'back')
