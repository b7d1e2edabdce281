"""Benchmark shape: a ~1B-active fine-grained MoE (OLMoE/DeepSeek-like: 64 experts, top-8 and a
shared expert), for one H100 in bf16.

configs/bench_e8k2.py (12 blocks of width 2048, 16 heads of width 128, a 32000-token vocabulary,
8 sequences of 2048 tokens per step) with full multi-head attention and 64 routed SwiGLU experts
of width 1408 (the fine-grained layer shape of docs/performance.md), top-8 with renormalised
weights, plus one shared expert of the same width. 1.27B parameters active per token, 7.08B in
all (bf16 weights and Adam moments: ~42 GB). `tools/benchmark.py train` and `model` measure it
against docs/performance.md's MFU target.
"""

import pathlib

from moetrain.config import load_config_file


def get_config():
  config = load_config_file(str(pathlib.Path(__file__).with_name('bench_e8k2.py')))
  m = config.model
  m.num_kv_heads = 16
  m.d_ff = 1408
  e = m.moe
  e.num_experts = 64
  e.top_k = 8
  e.d_expert = 1408
  e.num_shared_experts = 1
  e.d_shared_expert = 1408
  return config
