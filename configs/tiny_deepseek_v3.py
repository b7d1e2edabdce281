"""A toy DeepSeek-V3 (see configs/deepseek_v3.py) for CPU tests and quick experiments.

DeepSeek-V3's features at toy size: multi-head latent attention with a query latent and a
key/value latent, YaRN-scaled RoPE, a leading dense block, sigmoid-scored experts chosen top-k
from the best groups with renormalised weights scaled by 2.5, one shared expert,
auxiliary-loss-free bias balancing plus a small sequence-wise balance loss, no z-loss, untied
embeddings. Vocabulary and the train section come from configs/tiny.py, so it trains on the
embedded corpus in minutes.
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('tiny.py')))
  m = config.model
  m.d_model = 64
  m.num_layers = 3
  m.num_heads = 4
  m.num_kv_heads = 4  # MLA has no shared key/value heads; kept equal to num_heads
  m.d_ff = 128  # the leading dense block
  m.rope_theta = 10000.0
  r = m.rope_scaling
  # YaRN over a 64-token "pretraining" context, so the 256-token sequences of configs/tiny.py
  # use the extended range (DeepSeek-V3 extends 4096 by 40).
  r.type = 'yarn'
  r.factor = 4.0
  r.original_max_seq_len = 64
  r.beta_fast = 32.0
  r.beta_slow = 1.0
  r.mscale = 1.0
  r.mscale_all_dim = 1.0
  m.attention = 'mla'
  m.q_lora_rank = 32
  m.kv_lora_rank = 16
  m.qk_nope_head_dim = 16
  m.qk_rope_head_dim = 8
  m.v_head_dim = 16
  m.tie_embeddings = False

  e = m.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 32
  e.num_shared_experts = 1
  e.d_shared_expert = 32
  e.router = 'sigmoid'
  e.norm_topk_prob = True
  e.routed_scaling_factor = 2.5
  e.num_groups = 4  # 4 groups of 2 experts, the best 2 groups kept
  e.topk_groups = 2
  e.first_dense_layers = 1
  e.bias_update_rate = 1e-3
  e.aux_loss = 'sequence'
  e.aux_loss_weight = 1e-4
  e.z_loss_weight = 0.0
  return config
