"""Hugging Face checkpoints of every supported family convert to moetrain and back exactly."""

import jax
import numpy as np
import pytest

import moetrain
from moetrain import hlo_stats
from moetrain.convert import hf
from moetrain.convert.safetensors_io import Reader

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    'llama': ('LlamaConfig', dict(rope_theta=500000.0)),
    'llama3_rope': ('LlamaConfig', dict(rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), tie_word_embeddings=True)),
    'mistral': ('MistralConfig', dict(sliding_window=None)),
    'mixtral': ('MixtralConfig', dict(num_local_experts=4, num_experts_per_tok=2)),
    'qwen2_moe': ('Qwen2MoeConfig', dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40)),
    'qwen3_moe': ('Qwen3MoeConfig', dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24, head_dim=16,
                                         norm_topk_prob=True)),
    'olmoe': ('OlmoeConfig', dict(num_experts=4, num_experts_per_tok=2)),
    'deepseek_v3': ('DeepseekV3Config', dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        num_key_value_heads=4, num_hidden_layers=3,
        rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
}


def _hf_model(name, folder):
  """A tiny random transformers model of `name`, every tensor randomised, saved to `folder`."""
  config_class, extra = FAMILIES[name]
  config = getattr(transformers, config_class)(**{**COMMON, **extra})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if param_name.endswith('norm.weight') or 'layernorm' in param_name:
        param.copy_(1 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(0.05 * torch.randn_like(param))
    for buffer_name, buffer in model.named_buffers():
      if buffer_name.endswith('e_score_correction_bias'):
        buffer.copy_(0.01 * torch.randn_like(buffer))
  model.save_pretrained(folder)
  return model


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_family_converts_with_equal_logits_and_round_trips_bitwise(name, tmp_path):
  model = _hf_model(name, tmp_path / 'hf')
  hf.hf_to_moetrain(tmp_path / 'hf', tmp_path / 'moetrain')
  ours, config = moetrain.load(tmp_path / 'moetrain')
  # Hugging Face models route dropless, and fine-tuning them keeps it so.
  assert not config.model.moe.num_experts or config.model.moe.capacity_factor <= 0

  tokens = np.random.default_rng(1).integers(0, COMMON['vocab_size'], (2, 16))
  with torch.no_grad():
    expected = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(ours(tokens))
  assert np.abs(got - expected).max() <= 1e-4

  hf.moetrain_to_hf(tmp_path / 'moetrain', tmp_path / 'back', max_shard_bytes=20_000)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'back', output_loading_info=True)
  assert not any(info.values()), info
  with Reader(tmp_path / 'hf') as original, Reader(tmp_path / 'back') as back:
    assert original.names() == back.names()
    for tensor in original.names():
      a, b = original.get(tensor), back.get(tensor)
      assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), tensor
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.tensor(tokens)).logits.numpy(), expected)


def _qwen3_moe_forward_cost(num_experts, folder):
  """(FLOPs with loops counted as they run, XLA's own FLOP count, temporary bytes) of the
  jitted forward of a converted one-layer Qwen3-MoE (d_model 64, top-2) on 4 × 256 tokens."""
  config = transformers.Qwen3MoeConfig(
      vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
      num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=64,
      norm_topk_prob=True)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / 'hf')
  hf.hf_to_moetrain(folder / 'hf', folder / 'moetrain')
  model, _ = moetrain.load(folder / 'moetrain')
  tokens = np.zeros((4, 256), np.int32)
  compiled = jax.jit(lambda tokens: model(tokens)).lower(tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (hlo_stats.module_stats(compiled.as_text()).dot_flops, cost['flops'],
          compiled.memory_analysis().temp_size_in_bytes)


def test_dropless_forward_costs_what_it_computes_not_every_expert(tmp_path):
  """Eight times the experts at the same top-2: the routed rows stay the same, so FLOPs and
  temporary memory barely move (a dense product over all experts would grow ~E-fold)."""
  flops_8, xla_flops_8, temp_8 = _qwen3_moe_forward_cost(8, tmp_path / 'e8')
  flops_64, xla_flops_64, temp_64 = _qwen3_moe_forward_cost(64, tmp_path / 'e64')
  assert flops_64 <= 1.25 * flops_8, (flops_8, flops_64)
  assert xla_flops_64 <= 1.25 * xla_flops_8, (xla_flops_8, xla_flops_64)
  assert temp_64 <= 1.3 * temp_8, (temp_8, temp_64)
