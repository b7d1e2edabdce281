"""The CPU default: a small 8-expert top-2 MoE LM on the Python standard library's source.

Sized so that `make train` reaches an eval loss near 4 nats in a few minutes on 2 CPU cores.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.d_ff = 256
  m.max_seq_len = 256
  m.moe.num_experts = 8
  m.moe.top_k = 2

  t = config.train
  t.steps = 500
  t.batch_size = 16
  t.seq_len = 256
  t.learning_rate = 3e-3
  t.warmup_steps = 40
  t.eval_every = 100
  t.eval_batches = 8
  t.checkpoint_every = 100
  t.sample_tokens = 120
  return config
