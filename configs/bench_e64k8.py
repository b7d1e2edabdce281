"""Benchmark shape: a ~1B-active fine-grained MoE (OLMoE/DeepSeek-like: 64 experts, top-8 and a
shared expert), for one H100 in bf16.

12 blocks of width 2048 with 16 heads of width 128; 64 routed SwiGLU experts of width 1408
(PERFORMANCE.md's fine-grained layer shape), top-8 with renormalised weights, plus one shared
expert of the same width; a 32000-token vocabulary, untied. 1.27B parameters active per token,
7.08B in all (bf16 weights and Adam moments: ~42 GB). 8 sequences of 2048 tokens per step.
`tools/benchmark.py train` and `model` measure it against PERFORMANCE.md's MFU target.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 32000
  m.d_model = 2048
  m.num_layers = 12
  m.num_heads = 16
  m.num_kv_heads = 16
  m.d_ff = 1408
  m.max_seq_len = 2048
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True

  e = m.moe
  e.num_experts = 64
  e.top_k = 8
  e.d_expert = 1408
  e.num_shared_experts = 1
  e.d_shared_expert = 1408
  e.norm_topk_prob = True

  t = config.train
  t.batch_size = 8
  t.seq_len = 2048
  t.remat = 'none'
  t.document_mask = False  # lets GPUs run cuDNN's fused attention (it takes no document mask)
  return config
