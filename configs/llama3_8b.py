"""Llama-3.1-8B: the dense 8.03B-parameter model, a dense source for upcycling to an MoE.

Architecture numbers are those of the released model's Hugging Face config.json
(meta-llama/Llama-3.1-8B): 32 layers of width 4096, 32 query and 8 key/value heads of width 128,
SwiGLU width 14336, a 128256-token vocabulary with untied input and output embeddings, RoPE base
500000 with Llama 3.1's frequency-dependent scaling (factor 8 over an 8192-token pretraining
context, 131072 positions in all). `moetrain.convert.families.config_from_hf` gives the same
`model` section from that file (tests/test_configs.py checks it).

The train section is a plausible pretraining recipe for a large pod, not Meta's (the Llama 3
paper gives hyperparameters only for the 405B model): AdamW at 3e-4 as for Llama 2 7B, 4M-token
batches of 4096-token sequences. The data section stays at the default (the embedded corpus):
a real run needs a data source tokenised with Llama 3's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 128256
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.d_ff = 14336
  m.max_seq_len = 131072  # the released context; training below uses 4096
  m.rope_theta = 500000.0
  r = m.rope_scaling
  r.type = 'llama3'
  r.factor = 8.0
  r.original_max_seq_len = 8192
  r.low_freq_factor = 1.0
  r.high_freq_factor = 4.0
  m.tie_embeddings = False
  m.norm_eps = 1e-5
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # 32 identical blocks: compile one
  m.moe.num_experts = 0  # dense

  # Fully sharded data parallelism over the whole pod: 8B parameters plus AdamW moments fit
  # comfortably once split over a few dozen devices, and no model axis is needed.
  config.mesh.data = 1
  config.mesh.fsdp = -1

  t = config.train
  t.steps = 250_000  # ~1T tokens at 4M tokens per step
  t.batch_size = 1024  # sequences: 4M tokens per step, as Llama 3's early batches
  t.seq_len = 4096
  t.learning_rate = 3e-4
  t.warmup_steps = 2000
  t.min_lr_ratio = 0.1
  t.remat = 'save_dots'  # keep matmul outputs, recompute the cheap elementwise ops
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 1000
  t.permanent_every = 25_000
  return config
