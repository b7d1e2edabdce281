"""Qwen3-30B-A3B: 30.5B parameters, 128 fine-grained experts top-8 (3.3B active).

Architecture numbers are those of the released model's Hugging Face config.json
(Qwen/Qwen3-30B-A3B): 48 layers of width 2048, 32 query and 4 key/value heads of width 128 (the
heads are wider than 2048 / 32, hence the explicit head_dim), an RMSNorm over each query and key
head before RoPE, no q/k/v biases, 128 routed experts of width 768 chosen 8 per token with their
softmax weights renormalised (`norm_topk_prob: true`), no shared expert, a 151936-token
vocabulary with untied embeddings, RoPE base 1e6 over 40960 positions, RMSNorm epsilon 1e-6.
`intermediate_size` (6144) is kept as the dense width although every layer is MoE. The
auxiliary loss weight is the config's `router_aux_loss_coef` (0.001).
`moetrain.convert.families.config_from_hf` gives the same `model` section from that file
(tests/test_configs.py checks it).

The train section is a plausible recipe for a large pod; like the Qwen3 report it balances load
over the global batch rather than per sequence. The data section stays at the default (the
embedded corpus): a real run needs a data source tokenised with Qwen's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 151936
  m.d_model = 2048
  m.num_layers = 48
  m.num_heads = 32
  m.num_kv_heads = 4
  m.head_dim = 128
  m.d_ff = 6144
  m.max_seq_len = 40960  # the released context; training below uses 4096
  m.rope_theta = 1e6
  m.qk_norm = 'per_head'
  m.tie_embeddings = False
  m.norm_eps = 1e-6
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # 48 identical blocks: compile one

  e = m.moe
  e.num_experts = 128
  e.top_k = 8
  e.d_expert = 768
  e.norm_topk_prob = True
  e.aux_loss = 'global'  # Qwen3's global-batch load balancing
  e.aux_loss_weight = 0.001
  e.z_loss_weight = 0.0  # Qwen3 trains without a router z-loss
  # capacity_factor stays at 1.25, the measured fast path; the released model was trained
  # dropless (--config.model.moe.capacity_factor=0 to match it when fine-tuning).

  # 128 experts over 16 expert ranks (8 each), which also split the batch; the rest is FSDP.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 16

  t = config.train
  t.steps = 250_000  # ~1T tokens at 4M tokens per step
  t.batch_size = 1024  # sequences: 4M tokens per step
  t.seq_len = 4096
  t.learning_rate = 3e-4
  t.warmup_steps = 2000
  t.min_lr_ratio = 0.1
  t.remat = 'full'  # 48 blocks of 8 routed experts per token: recompute, don't store
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 1000
  t.permanent_every = 25_000
  return config
