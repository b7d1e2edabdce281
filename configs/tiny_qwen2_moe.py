"""A toy Qwen2-MoE (see configs/qwen2_moe_a2_7b.py) for CPU tests and quick experiments.

Qwen1.5-MoE's features at toy size: q/k/v biases, full multi-head attention, untied
embeddings, RoPE base 1e6, fine-grained experts chosen top-k without renormalising their softmax
weights, and one wide shared expert scaled by a sigmoid gate. Vocabulary and the train section
come from configs/tiny.py, so it trains on the embedded corpus in minutes.
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('tiny.py')))
  m = config.model
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 4
  m.d_ff = 128
  m.rope_theta = 1e6
  m.attention_bias = True
  m.tie_embeddings = False

  e = m.moe
  e.num_experts = 8
  e.top_k = 4  # Qwen's top-4 of fine-grained experts
  e.d_expert = 32  # a quarter of d_ff, as 1408 is of 5632
  e.num_shared_experts = 1
  e.d_shared_expert = 128  # as wide as the dense SwiGLU, as 5632 in the released model
  e.shared_expert_gate = True
  e.norm_topk_prob = False
  return config
