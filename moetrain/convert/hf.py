"""Hugging Face safetensors ↔ moetrain checkpoints, one tensor at a time.

`tensor_plan` lists, for a moetrain config and a family, every Hugging Face tensor and where it
lives in moetrain's flat per-layer namespace (`models.layout`): which array, which expert slot,
and how it is transposed or permuted. Import and export walk the same plan in opposite
directions, so a round trip returns the same bits.
"""

import dataclasses
import sys

import numpy as np

from moetrain import checkpoint
from moetrain.convert import families
from moetrain.convert.safetensors_io import ConversionError, Reader, write_checkpoint
from moetrain.models import layout
from moetrain.models.plan import is_moe_layer

_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers older checkpoints saved


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor and its place in moetrain.

  `in_dims`: a linear layer's weight ([out, in] there) whose moetrain array has this many
  leading input axes (transposed); None: the same elements in the same order (reshaped only).
  `rows`: a permutation of the Hugging Face tensor's rows applied on import.
  """
  hf_name: str
  name: str  # flat moetrain name
  kind: str = 'params'  # params | buffers
  expert: int | None = None
  in_dims: int | None = None
  rows: tuple | None = None
  vector: bool = False  # held flat there (biases of [heads, head_dim])


def _rope_rows(before: int, rotary: int, after: int, repeats: int = 1) -> tuple:
  """Row order turning DeepSeek's interleaved rotary pairs into moetrain's half split."""
  block = list(range(before)) + [before + i for i in range(0, rotary, 2)] + [
      before + i for i in range(1, rotary, 2)] + list(range(before + rotary, before + rotary
                                                              + after))
  width = len(block)
  return tuple(r * width + i for r in range(repeats) for i in block)


def _attention(prefix: str, name: str, m, interleaved: bool) -> list:
  if m.attention == 'mha':
    plan = [Tensor(f'{prefix}.q_proj.weight', f'{name}/wq', in_dims=1),
            Tensor(f'{prefix}.k_proj.weight', f'{name}/wk', in_dims=1),
            Tensor(f'{prefix}.v_proj.weight', f'{name}/wv', in_dims=1),
            Tensor(f'{prefix}.o_proj.weight', f'{name}/wo', in_dims=2)]
    if m.attention_bias:
      plan += [Tensor(f'{prefix}.{x}_proj.bias', f'{name}/{x}_bias', vector=True)
               for x in 'qkv']
    if m.qk_norm != 'none':
      plan += [Tensor(f'{prefix}.{x}_norm.weight', f'{name}/{x}_norm/scale') for x in 'qk']
    return plan
  nope, rot = m.qk_nope_head_dim, m.qk_rope_head_dim
  q_rows = _rope_rows(nope, rot, 0, m.num_heads) if interleaved else None
  kv_rows = _rope_rows(m.kv_lora_rank, rot, 0) if interleaved else None
  if m.q_lora_rank:
    plan = [Tensor(f'{prefix}.q_a_proj.weight', f'{name}/wq_a', in_dims=1),
            Tensor(f'{prefix}.q_a_layernorm.weight', f'{name}/q_norm/scale'),
            Tensor(f'{prefix}.q_b_proj.weight', f'{name}/wq_b', in_dims=1, rows=q_rows)]
  else:
    plan = [Tensor(f'{prefix}.q_proj.weight', f'{name}/wq', in_dims=1, rows=q_rows)]
  return plan + [
      Tensor(f'{prefix}.kv_a_proj_with_mqa.weight', f'{name}/wkv_a', in_dims=1, rows=kv_rows),
      Tensor(f'{prefix}.kv_a_layernorm.weight', f'{name}/kv_norm/scale'),
      Tensor(f'{prefix}.kv_b_proj.weight', f'{name}/wkv_b', in_dims=1),
      Tensor(f'{prefix}.o_proj.weight', f'{name}/wo', in_dims=2)]


def _mlp(prefix: str, name: str, expert=None, names=('gate_proj', 'up_proj', 'down_proj')):
  return [Tensor(f'{prefix}.{hf}.weight', f'{name}/{ours}', expert=expert, in_dims=1)
          for hf, ours in zip(names, ('w_gate', 'w_up', 'w_down'))]


def _mtp(prefix: str, name: str, m) -> list:
  """A DeepSeek-V3 multi-token-prediction layer's own tensors (its block is planned as a
  layer's). It stores copies of the embedding and the output head, which moetrain shares."""
  head = 'embed' if m.tie_embeddings else 'unembed'
  return [Tensor(f'{prefix}.embed_tokens.weight', 'embed'),
          Tensor(f'{prefix}.enorm.weight', f'{name}/enorm/scale'),
          Tensor(f'{prefix}.hnorm.weight', f'{name}/hnorm/scale'),
          Tensor(f'{prefix}.eh_proj.weight', f'{name}/eh_proj', in_dims=1),
          Tensor(f'{prefix}.shared_head.norm.weight', f'{name}/norm/scale'),
          Tensor(f'{prefix}.shared_head.head.weight', head, in_dims=None if m.tie_embeddings
                 else 1)]


def tensor_plan(config, family: families.Family, interleaved: bool = False) -> list:
  """Every tensor of `config`'s model in `family`'s naming, in checkpoint order."""
  m, e = config.model, config.model.moe
  plan = [Tensor('model.embed_tokens.weight', 'embed')]
  for i in range(m.num_layers + m.mtp_layers):
    hf, ours = f'model.layers.{i}', f'blocks/{i}'
    if i >= m.num_layers:
      plan += _mtp(hf, f'mtp/{i - m.num_layers}', m)
    plan += [Tensor(f'{hf}.input_layernorm.weight', f'{ours}/attention_norm/scale'),
             Tensor(f'{hf}.post_attention_layernorm.weight', f'{ours}/ffn_norm/scale')]
    plan += _attention(f'{hf}.self_attn', f'{ours}/attention', m, interleaved)
    if not is_moe_layer(m, i):
      plan += _mlp(f'{hf}.mlp', f'{ours}/ffn')
      continue
    moe = f'{hf}.{family.moe_module}'
    plan.append(Tensor(f'{moe}.gate.weight', f'{ours}/ffn/router', in_dims=1))
    for j in range(e.num_experts):
      plan += _mlp(f'{moe}.experts.{j}', f'{ours}/ffn', j, family.expert_names)
    if e.num_shared_experts:
      plan += _mlp(f'{moe}.{family.shared_module}', f'{ours}/ffn/shared')
    if e.shared_expert_gate:
      plan.append(Tensor(f'{moe}.shared_expert_gate.weight', f'{ours}/ffn/shared_gate',
                         in_dims=1))
    if e.bias_update_rate:
      plan.append(Tensor(f'{moe}.gate.e_score_correction_bias', f'{ours}/ffn/router_bias',
                         kind='buffers'))
  plan.append(Tensor('model.norm.weight', 'final_norm/scale'))
  if not m.tie_embeddings:
    plan.append(Tensor('lm_head.weight', 'unembed', in_dims=1))
  return plan


def to_moetrain(tensor: Tensor, value: np.ndarray, shape: tuple) -> np.ndarray:
  """A Hugging Face tensor in moetrain's layout of `shape` (one expert's slot for experts)."""
  if tensor.rows is not None:
    value = value[np.asarray(tensor.rows)]
  if tensor.in_dims is not None:
    value = value.T
  return value.reshape(shape)


def to_hf(tensor: Tensor, value: np.ndarray) -> np.ndarray:
  """The inverse of `to_moetrain`."""
  if tensor.in_dims is not None:
    value = value.reshape(int(np.prod(value.shape[:tensor.in_dims])), -1).T
  elif tensor.vector:
    value = value.reshape(-1)
  if tensor.rows is not None:
    value = value[np.argsort(np.asarray(tensor.rows))]
  return np.ascontiguousarray(value)


def _zeros(model_config) -> dict:
  """Zero arrays in the model's layout, and flat per-layer views into them to fill."""
  import jax
  from moetrain.pretrained import abstract_weights
  _, params, buffers = abstract_weights(model_config)
  trees = {kind: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
           for kind, tree in (('params', params), ('buffers', buffers))}
  views = {kind: layout.to_layers(tree, model_config) for kind, tree in trees.items()}
  return trees, views


def _check_tensors(reader: Reader, plan: list, shapes: dict, source: str) -> None:
  """Every planned tensor is there with a fitting shape; checked before any data is read."""
  present = set(reader.names())
  for tensor in plan:
    if tensor.hf_name not in present:
      raise ConversionError(f'{source}: tensor {tensor.hf_name} is missing')
    target = shapes[tensor.kind][tensor.name]
    target = target.shape[1:] if tensor.expert is not None else target.shape
    hf_shape = tuple(reader.shape(tensor.hf_name))
    if int(np.prod(hf_shape)) != int(np.prod(target)) or (
        tensor.in_dims is not None and hf_shape[::-1][0] != int(np.prod(
            target[:tensor.in_dims]))):
      raise ConversionError(f'{source}: tensor {tensor.hf_name} has shape {list(hf_shape)}, '
                            f'which does not fit moetrain {tensor.name} {list(target)}')


def _leftovers(reader: Reader, plan: list, source: str) -> None:
  """Tensors no plan entry uses are refused."""
  used = {tensor.hf_name for tensor in plan}
  extra = [name for name in reader.names() if name not in used and not reader.is_auxiliary(name)
           and not name.endswith(_IGNORED_SUFFIXES)]
  if extra:
    raise ConversionError(f'{source}: tensor {extra[0]} has no place in the moetrain model '
                          f'this config.json describes ({len(extra)} such tensors)')


def _mtp_layers_present(reader: Reader, config, source: str, log) -> int:
  """The multi-token-prediction layers the files hold: the layers numbered after the decoder's
  N. transformers saves DeepSeek-V3 without them although its config.json declares one: such
  a checkpoint converts without them, with a notice."""
  n, declared = config.model.num_layers, config.model.mtp_layers
  present = sorted({int(name.split('.')[2]) for name in reader.names()
                    if name.startswith('model.layers.') and int(name.split('.')[2]) >= n})
  if declared and not present:
    log(f'moetrain: {source}: config.json declares {declared} multi-token-prediction layer(s) '
        'but the checkpoint holds none; converting without them')
    return 0
  if declared and present != list(range(n, n + declared)):
    raise ConversionError(f'{source}: config.json declares num_nextn_predict_layers='
                          f'{declared}, but the checkpoint holds layers '
                          f'{", ".join(map(str, present))} after its {n} decoder layers')
  return declared


def hf_to_moetrain(folder, out_dir, *, progress=None, log=None) -> object:
  """Converts the Hugging Face checkpoint in `folder` to a moetrain checkpoint in `out_dir`
  (weights only, step 0); returns its config. Nothing is written unless all of it converts."""
  log = log or (lambda line: print(line, file=sys.stderr))
  checkpoint.check_new_directory(out_dir)
  with Reader(folder) as reader:
    hf_config = reader.config()
    source = str(folder)
    family = families.family_of(hf_config, source)
    config = families.config_from_hf(hf_config, f'{folder}/config.json')
    config.model.mtp_layers = _mtp_layers_present(reader, config, source, log)
    interleaved = bool(hf_config.get('rope_interleave', family.model_type == 'deepseek_v3'))
    plan = tensor_plan(config, family, interleaved)
    trees, shapes = _zeros(config.model)
    _check_tensors(reader, plan, shapes, source)
    _leftovers(reader, plan, source)
    block = (hf_config.get('quantization_config') or {}).get('weight_block_size')
    first = {}  # (kind, name, expert) → the Hugging Face tensor that filled it
    for tensor in plan:
      target = shapes[tensor.kind][tensor.name]
      if tensor.expert is not None:
        target = target[tensor.expert]
      value = to_moetrain(tensor, (reader.get_dequantized(tensor.hf_name, block) if block else
                                   reader.get_dequantized(tensor.hf_name)), target.shape)
      value = value.astype(target.dtype)
      filled = first.setdefault((tensor.kind, tensor.name, tensor.expert), tensor.hf_name)
      if filled != tensor.hf_name and value.tobytes() != target.tobytes():
        raise ConversionError(f'{source}: tensor {tensor.hf_name} differs from {filled}; '
                              'moetrain shares them')
      target[...] = value
      if progress:
        progress(tensor.hf_name)
  checkpoint.save_model(out_dir, trees['params'], trees['buffers'], config)
  return config


_EXPERT_MAP = '/ffn/expert_map'
_EXPERT_WEIGHTS = tuple(f'/ffn/{name}' for name in ('w_gate', 'w_up', 'w_down'))


def expert_maps(checkpoint_dir, config, buffers) -> dict:
  """{'blocks/i': router map [R]} of a model with merged experts (none otherwise)."""
  if not config.model.moe.router_outputs > config.model.moe.num_experts:
    return {}
  return {path.split('/ffn/')[0]: array
          for _, path, array in _layer_arrays(checkpoint_dir, {}, buffers, config)
          if path.endswith(_EXPERT_MAP)}


def _layer_arrays(checkpoint_dir, params, buffers, config):
  """(kind, flat per-layer name, numpy array) of every stored array, one at a time."""
  for kind, path, array in checkpoint.weights_one_by_one(checkpoint_dir, params, buffers):
    for name, layer in layout.to_layers(layout.unflatten({path: array}), config.model).items():
      yield kind, name, np.asarray(layer)


def expanded(config, maps: dict):
  """Merged experts as the ordinary model of R experts with the same logits (expert r a copy
  of merged expert map[r]), for formats without a router map: -> (config, a function
  (name, array) -> array, None for the map itself)."""
  if not maps:
    return config, lambda name, array: array
  config = config.copy_and_resolve_references()
  config.model.moe.num_experts = config.model.moe.router_outputs
  config.model.moe.router_outputs = 0

  def expand(name, array):
    if name.endswith(_EXPERT_MAP):
      return None
    layer = name.split('/ffn/')[0]
    return array[maps[layer]] if name.endswith(_EXPERT_WEIGHTS) and layer in maps else array
  return config, expand


def moetrain_to_hf(checkpoint_dir, out_folder, *, family_name: str = '',
                   max_shard_bytes: int = 5 * 2**30, progress=None,
                   log=print) -> families.Family:
  """Writes the newest checkpoint in `checkpoint_dir` as a Hugging Face folder; returns the
  family used (`family_name`, or the one `families.family_for` picks). Merged experts are
  written expanded (`expanded`) and dynamic skipping dropped, each with a notice through
  `log`."""
  import jax
  from moetrain.pretrained import abstract_weights
  checkpoint.check_new_directory(out_folder)
  stored = checkpoint.model_config(checkpoint_dir)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  _, params, buffers = abstract_weights(stored.model, cpu)
  maps = expert_maps(checkpoint_dir, stored, buffers)
  config, expand = expanded(stored, maps)
  if maps:
    log(f'merged experts: model.moe.router_outputs={stored.model.moe.router_outputs} router '
        f'outputs share {stored.model.moe.num_experts} experts; Hugging Face has no router map, '
        f'so each output gets a copy of its expert ({config.model.moe.num_experts} experts, the '
        'same logits, not smaller)')
  if stored.model.moe.skip_ratio:
    log(f'model.moe.skip_ratio={stored.model.moe.skip_ratio}: Hugging Face models compute every '
        'chosen expert; the converted model skips none')
  if family_name and family_name not in families.FAMILIES:
    raise ConversionError(f'--family {family_name}: not one of '
                          f'{", ".join(sorted(families.FAMILIES))}')
  family = families.FAMILIES[family_name] if family_name else families.family_for(config)
  hf_config = families.config_to_hf(config, family)
  plan = tensor_plan(config, family, interleaved=family.model_type == 'deepseek_v3')
  by_name = {}
  for tensor in plan:
    by_name.setdefault((tensor.kind, tensor.name), []).append(tensor)

  def tensors():
    # One stored array at a time (a scanned stack holds a parameter of every layer).
    for kind, name, layer in _layer_arrays(checkpoint_dir, params, buffers, stored):
      layer = expand(name, layer)
      for tensor in by_name[kind, name] if layer is not None else ():
        yield tensor.hf_name, to_hf(tensor, layer if tensor.expert is None
                                    else layer[tensor.expert])
  write_checkpoint(out_folder, tensors(), hf_config, max_shard_bytes, progress)
  return family
