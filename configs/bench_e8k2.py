"""Benchmark shape: a ~1B-active Mixtral-like MoE (8 experts, top-2), for one H100 in bf16.

12 blocks of width 2048 with 16 query and 8 key/value heads of width 128; 8 SwiGLU experts of
width 5632 (the E8 top-2 layer shape of docs/performance.md), top-2 with renormalised weights;
a 32000-token vocabulary, untied. 1.11B parameters active per token, 3.60B in all (bf16 weights
and Adam moments: ~22 GB). 8 sequences of 2048 tokens (16384 tokens, the layer benchmark's) per
step. `tools/benchmark.py train` and `model` measure it against docs/performance.md's MFU
target.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 32000
  m.d_model = 2048
  m.num_layers = 12
  m.num_heads = 16
  m.num_kv_heads = 8
  m.d_ff = 5632
  m.max_seq_len = 2048
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True

  e = m.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 5632
  e.norm_topk_prob = True

  t = config.train
  t.batch_size = 8
  t.seq_len = 2048
  t.remat = 'none'
  t.document_mask = False  # lets GPUs run cuDNN's fused attention (it takes no document mask)
  return config
