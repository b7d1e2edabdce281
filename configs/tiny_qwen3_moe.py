"""A toy Qwen3-MoE (see configs/qwen3_30b_a3b.py) for CPU tests and quick experiments.

Qwen3-MoE's features at toy size: grouped-query attention with heads wider than
d_model / num_heads, RMSNorm of each query and key head, no q/k/v biases, untied embeddings,
RoPE base 1e6, narrow experts chosen top-k with renormalised softmax weights, no shared expert.
Vocabulary and the train section come from configs/tiny.py, so it trains on the embedded corpus
in minutes.
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('tiny.py')))
  m = config.model
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32  # twice d_model / num_heads, as 128 is of 2048 / 32
  m.d_ff = 128
  m.rope_theta = 1e6
  m.qk_norm = 'per_head'
  m.tie_embeddings = False

  e = m.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 32
  e.norm_topk_prob = True
  return config
