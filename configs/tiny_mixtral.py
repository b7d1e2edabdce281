"""A toy Mixtral (see configs/mixtral_8x7b.py) for CPU tests and quick experiments.

Mixtral's features at toy size: grouped-query attention, untied embeddings, RoPE base 1e6,
RMSNorm epsilon 1e-5, a few full-width SwiGLU experts chosen top-2 with renormalised softmax
weights. Vocabulary and the train section come from configs/tiny.py, so it trains on the
embedded corpus in minutes.
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('tiny.py')))
  m = config.model
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2  # grouped-query attention, as Mixtral's 32 / 8
  m.d_ff = 128
  m.rope_theta = 1e6
  m.tie_embeddings = False
  m.norm_eps = 1e-5

  e = m.moe
  e.num_experts = 4
  e.top_k = 2
  e.d_expert = 0  # experts as wide as the dense SwiGLU, as in Mixtral
  e.norm_topk_prob = True
  return config
