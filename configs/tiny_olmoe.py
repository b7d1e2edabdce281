"""A toy OLMoE (see configs/olmoe_1b7b.py) for CPU tests and quick experiments.

OLMoE's features at toy size: full multi-head attention with an RMSNorm over the whole query
and key projections, untied embeddings, RMSNorm epsilon 1e-5, narrow experts chosen top-k
without renormalising their softmax weights, load-balancing loss 0.01 and router z-loss 0.001.
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
  m.num_kv_heads = 4
  m.d_ff = 32
  m.rope_theta = 10000.0
  m.qk_norm = 'full'
  m.tie_embeddings = False
  m.norm_eps = 1e-5

  e = m.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 32  # half of d_model, as OLMoE's 1024 is of 2048
  e.norm_topk_prob = False
  e.aux_loss_weight = 0.01
  e.z_loss_weight = 0.001
  return config
