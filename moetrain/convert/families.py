"""The Hugging Face model families moetrain reads and writes, as data.

A family says how a Hugging Face `config.json` maps onto moetrain's `model` section and how
its tensors are named. Everything that differs between Llama, Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE and DeepSeek-V3 is a config value in moetrain; the tables here only translate names.
"""

import dataclasses

from moetrain import config as config_lib
from moetrain.convert.safetensors_io import ConversionError
from moetrain.models.plan import is_moe_layer


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face `model_type` is laid out."""
  model_type: str
  architecture: str
  moe_module: str = 'mlp'  # module holding router and experts: mlp | block_sparse_moe
  expert_names: tuple = ('gate_proj', 'up_proj', 'down_proj')  # SwiGLU gate, up, down
  shared_module: str = ''  # shared_expert (Qwen2-MoE) | shared_experts (DeepSeek-V3)
  experts_key: str = 'num_experts'  # config.json key of the routed expert count
  d_expert_key: str = 'moe_intermediate_size'


FAMILIES = {f.model_type: f for f in (
    Family('llama', 'LlamaForCausalLM'),
    Family('mistral', 'MistralForCausalLM'),
    Family('mixtral', 'MixtralForCausalLM', moe_module='block_sparse_moe',
           expert_names=('w1', 'w3', 'w2'), experts_key='num_local_experts',
           d_expert_key='intermediate_size'),
    Family('qwen2_moe', 'Qwen2MoeForCausalLM', shared_module='shared_expert'),
    Family('qwen3_moe', 'Qwen3MoeForCausalLM'),
    Family('olmoe', 'OlmoeForCausalLM', d_expert_key='intermediate_size'),
    Family('deepseek_v3', 'DeepseekV3ForCausalLM', shared_module='shared_experts',
           experts_key='n_routed_experts'),
)}

DENSE = ('llama', 'mistral')

# Hugging Face config values moetrain cannot express; a checkpoint using them is refused.
UNSUPPORTED = {
    'attention_bias': (True,), 'mlp_bias': (True,), 'clip_qkv': 'set',
    'mlp_only_layers': 'set', 'use_sliding_window': (True,), 'sliding_window': 'set',
    'hidden_act': 'not silu', 'partial_rotary_factor': 'set',
}


def family_of(hf: dict, source: str) -> Family:
  """The family of a Hugging Face config; ConversionError listing the supported ones."""
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise ConversionError(f'{source}: model_type {model_type!r} is not supported; supported: '
                          f'{", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_type]


def _rope_parameters(hf: dict) -> dict:
  """transformers 5 `rope_parameters`, or the older `rope_theta` + `rope_scaling` keys."""
  params = dict(hf.get('rope_parameters') or {})
  params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  for key, value in (hf.get('rope_scaling') or {}).items():
    params.setdefault(key, value)
  params['rope_type'] = params.get('rope_type', params.get('type', 'default'))
  return params


def _check_supported(hf: dict, family: Family, source: str) -> None:
  for key, bad in UNSUPPORTED.items():
    value = hf.get(key)
    if key == 'attention_bias' and family.model_type == 'qwen2_moe':
      continue
    if key == 'sliding_window' and not hf.get('use_sliding_window', True):
      continue  # Qwen writes a window size it does not use
    refused = (value not in (None, 'silu') if bad == 'not silu' else
               bool(value) if bad == 'set' else value in bad)
    if refused:
      raise ConversionError(f'{source}: {key}={value!r} is not supported by moetrain')
  rope = _rope_parameters(hf)
  if rope['rope_type'] not in ('default', 'yarn', 'llama3'):
    raise ConversionError(f'{source}: rope type {rope["rope_type"]!r} is not supported '
                          '(default, yarn, llama3)')


def config_from_hf(hf: dict, source: str = 'config.json'):
  """A moetrain config (defaults outside `model`) for a Hugging Face `config.json` dict."""
  family = family_of(hf, source)
  _check_supported(hf, family, source)
  config = config_lib.default_config()
  m, e = config.model, config.model.moe
  heads = hf['num_attention_heads']
  m.vocab_size, m.d_model = hf['vocab_size'], hf['hidden_size']
  m.num_layers, m.num_heads = hf['num_hidden_layers'], heads
  m.num_kv_heads = hf.get('num_key_value_heads') or heads
  head_dim = hf.get('head_dim') or hf['hidden_size'] // heads
  m.head_dim = 0 if head_dim * heads == hf['hidden_size'] else head_dim
  m.d_ff = hf['intermediate_size']
  m.max_seq_len = hf['max_position_embeddings']
  m.norm_eps = float(hf.get('rms_norm_eps', 1e-6))
  m.tie_embeddings = bool(hf.get('tie_word_embeddings', False))
  m.init_std = float(hf.get('initializer_range', 0.02))
  dtype = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  m.dtype = m.param_dtype = 'bfloat16' if dtype == 'bfloat16' else 'float32'
  _rope_from_hf(m, _rope_parameters(hf))
  m.scan_layers = m.num_layers > 8  # compile time flat in depth for real sizes
  config.train.seq_len = min(config.train.seq_len, m.max_seq_len)
  if family.model_type in DENSE:
    e.num_experts = 0
  else:
    _moe_from_hf(m, e, hf, family, source)
  config_lib.validate(config)
  return config


def _moe_from_hf(m, e, hf: dict, family: Family, source: str) -> None:
  # transformers 5 writes Qwen3-MoE's count as num_local_experts; the Hub has num_experts.
  e.num_experts = hf.get(family.experts_key) or hf['num_local_experts']
  e.top_k = hf['num_experts_per_tok']
  e.d_expert = hf[family.d_expert_key]
  e.norm_topk_prob = bool(hf.get('norm_topk_prob', family.model_type == 'mixtral'))
  e.layer_interval = hf.get('decoder_sparse_step') or hf.get('moe_layer_freq') or 1
  e.aux_loss_weight = float(hf.get('router_aux_loss_coef', e.aux_loss_weight))
  e.z_loss_weight = float(hf.get('router_z_loss_coef', 0.0))
  # Checkpoints were trained dropless; fine-tuning and its evaluation keep it so.
  e.capacity_factor = e.eval_capacity_factor = 0.0
  if family.model_type == 'qwen2_moe':
    m.attention_bias = bool(hf.get('qkv_bias', True))
    e.num_shared_experts = 1 if hf.get('shared_expert_intermediate_size') else 0
    e.d_shared_expert = hf.get('shared_expert_intermediate_size', 0)
    e.shared_expert_gate = bool(e.num_shared_experts)
  elif family.model_type == 'qwen3_moe':
    m.qk_norm = 'per_head'
  elif family.model_type == 'olmoe':
    m.qk_norm = 'full'
  elif family.model_type == 'deepseek_v3':
    _deepseek_from_hf(m, e, hf, source)


def _rope_from_hf(m, rope: dict) -> None:
  m.rope_theta = float(rope['rope_theta'])
  s = m.rope_scaling
  s.type = {'default': 'none'}.get(rope['rope_type'], rope['rope_type'])
  if s.type == 'none':
    return
  s.factor = float(rope['factor'])
  s.original_max_seq_len = int(rope['original_max_position_embeddings'])
  for key in ('beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'low_freq_factor',
              'high_freq_factor'):
    if rope.get(key) is not None:
      s[key] = float(rope[key])


def _deepseek_from_hf(m, e, hf: dict, source: str) -> None:
  if hf.get('topk_method', 'noaux_tc') != 'noaux_tc' or hf.get('scoring_func',
                                                               'sigmoid') != 'sigmoid':
    raise ConversionError(f'{source}: only DeepSeek-V3 routing (sigmoid scores, noaux_tc) is '
                          'supported')
  m.attention, m.head_dim, m.num_kv_heads = 'mla', 0, m.num_heads
  m.q_lora_rank = hf.get('q_lora_rank') or 0
  for key in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
    m[key] = hf[key]
  e.num_shared_experts = hf.get('n_shared_experts') or 0
  e.d_shared_expert = hf['moe_intermediate_size']
  e.router = 'sigmoid'
  e.routed_scaling_factor = float(hf.get('routed_scaling_factor', 1.0))
  e.num_groups, e.topk_groups = hf.get('n_group') or 1, hf.get('topk_group') or 1
  e.first_dense_layers = hf.get('first_k_dense_replace', 0)
  m.mtp_layers = hf.get('num_nextn_predict_layers') or 0
  # The balancing bias is part of the model; DeepSeek-V3 updates it by 1e-3 and adds a
  # sequence-wise balance loss of weight 1e-4.
  e.bias_update_rate, e.aux_loss, e.aux_loss_weight = 1e-3, 'sequence', 1e-4


# moetrain fields that change what a model computes, beyond its parameter shapes.
BEHAVIOUR = ('rope_theta', 'norm_eps', 'tie_embeddings', 'qk_norm', 'attention',
             'attention_experts', 'attention_bias', 'rope_scaling', 'moe.router',
             'moe.norm_topk_prob',
             'moe.routed_scaling_factor', 'moe.num_groups', 'moe.topk_groups',
             'moe.shared_expert_gate', 'moe.num_null_experts', 'moe.first_dense_layers',
             'moe.layer_interval', 'moe.num_experts', 'moe.top_k')


def config_to_hf(config, family: Family) -> dict:
  """The Hugging Face `config.json` of `config` in `family`; ConversionError naming the
  first moetrain field the family cannot express."""
  m, e = config.model, config.model.moe
  if (family.model_type in DENSE) != (not e.num_experts):
    raise ConversionError(f'model.moe.num_experts={e.num_experts} cannot be expressed as a '
                          f'Hugging Face {family.model_type} model')
  hf = {'architectures': [family.architecture], 'model_type': family.model_type,
        'vocab_size': m.vocab_size, 'hidden_size': m.d_model,
        'intermediate_size': m.d_ff, 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads,
        'head_dim': m.head_dim or m.d_model // m.num_heads,
        'max_position_embeddings': m.max_seq_len, 'rms_norm_eps': m.norm_eps,
        'tie_word_embeddings': m.tie_embeddings, 'initializer_range': m.init_std,
        'hidden_act': 'silu', 'dtype': m.param_dtype, 'rope_parameters': _rope_to_hf(m)}
  if family.model_type not in DENSE:
    hf.update({family.experts_key: e.num_experts, 'num_experts_per_tok': e.top_k,
               'norm_topk_prob': e.norm_topk_prob, 'router_aux_loss_coef': e.aux_loss_weight,
               family.d_expert_key: e.d_expert or m.d_ff})
  if family.model_type in ('qwen2_moe', 'qwen3_moe'):
    hf.update({'decoder_sparse_step': e.layer_interval, 'mlp_only_layers': []})
  if family.model_type == 'qwen2_moe':
    hf.update({'qkv_bias': m.attention_bias,
               'shared_expert_intermediate_size': e.num_shared_experts * (
                   e.d_shared_expert or e.d_expert or m.d_ff)})
  if family.model_type == 'deepseek_v3':
    hf.update({'q_lora_rank': m.q_lora_rank or None, 'kv_lora_rank': m.kv_lora_rank,
               'qk_nope_head_dim': m.qk_nope_head_dim, 'qk_rope_head_dim': m.qk_rope_head_dim,
               'v_head_dim': m.v_head_dim, 'head_dim': m.qk_rope_head_dim,
               'num_key_value_heads': m.num_heads,
               'n_shared_experts': e.num_shared_experts, 'n_group': e.num_groups,
               'topk_group': e.topk_groups, 'routed_scaling_factor': e.routed_scaling_factor,
               'first_k_dense_replace': e.first_dense_layers, 'moe_layer_freq': 1,
               'rope_interleave': True, 'num_nextn_predict_layers': m.mtp_layers,
               'topk_method': 'noaux_tc', 'scoring_func': 'sigmoid'})
  _check_expressible(config, config_from_hf(hf), family)
  return hf


def _rope_to_hf(m) -> dict:
  s = m.rope_scaling
  if s.type == 'none':
    return {'rope_type': 'default', 'rope_theta': m.rope_theta}
  keys = (('beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim') if s.type == 'yarn' else
          ('low_freq_factor', 'high_freq_factor'))
  return {'rope_type': s.type, 'rope_theta': m.rope_theta, 'factor': s.factor,
          'original_max_position_embeddings': s.original_max_seq_len,
          **{key: s[key] for key in keys}}


def _check_expressible(config, back, family: Family) -> None:
  """Reads the written config back; any model field that changed cannot be expressed."""
  def get(c, name):
    node = c.model
    for part in name.split('.'):
      node = node[part]
    return node.to_dict() if hasattr(node, 'to_dict') else node
  m = config.model
  sizes = ['vocab_size', 'd_model', 'num_layers', 'num_heads', 'mtp_layers']
  if m.attention == 'mha':
    sizes += ['num_kv_heads']
  if any(not is_moe_layer(m, i) for i in range(m.num_layers)):
    sizes += ['d_ff']
  if m.moe.num_experts:
    sizes += ['moe.d_expert', 'moe.num_shared_experts']
  effective = lambda c, name: (c.model.moe.d_expert or c.model.d_ff if name == 'moe.d_expert'
                               else (c.model.head_dim or c.model.d_model // c.model.num_heads)
                               if name == 'head_dim' else get(c, name))
  for name in sizes + ['head_dim'] * (m.attention == 'mha') + list(BEHAVIOUR):
    if name.startswith('moe.') and not m.moe.num_experts and name != 'moe.num_experts':
      continue
    if effective(config, name) != effective(back, name):
      raise ConversionError(f'model.{name}={effective(config, name)!r} cannot be expressed as '
                            f'a Hugging Face {family.model_type} model')


def family_for(config) -> Family:
  """The Hugging Face family that expresses a moetrain config most directly."""
  m, e = config.model, config.model.moe
  if m.attention == 'mla':
    return FAMILIES['deepseek_v3']
  if not e.num_experts:
    return FAMILIES['llama']
  if m.qk_norm == 'full':
    return FAMILIES['olmoe']
  if m.qk_norm == 'per_head':
    return FAMILIES['qwen3_moe']
  if e.num_shared_experts or m.attention_bias or e.layer_interval > 1:
    return FAMILIES['qwen2_moe']
  return FAMILIES['mixtral']
