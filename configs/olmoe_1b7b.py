"""OLMoE-1B-7B-0924: 6.9B parameters, 64 fine-grained experts top-8 (1.3B active).

Architecture numbers are those of the released model's Hugging Face config.json
(allenai/OLMoE-1B-7B-0924): 16 layers of width 2048, 16 heads of width 128 (no GQA), an RMSNorm
over the whole query and the whole key projection before RoPE, 64 routed experts of width 1024
chosen 8 per token without renormalising their softmax weights (`norm_topk_prob: false`), no
shared expert, a 50304-token vocabulary with untied embeddings, RoPE base 10000 over 4096
positions, RMSNorm epsilon 1e-5. `moetrain.convert.families.config_from_hf` gives the same
`model` section from that file (tests/test_configs.py checks it).

The train section follows the OLMoE paper (arXiv 2409.02060): 4M-token batches of 4096-token
sequences, AdamW at 4e-4 with ~10B tokens of warmup and cosine decay to 5e-5, load-balancing loss
0.01 and router z-loss 0.001. The data section stays at the default (the embedded corpus): a
real run needs a data source tokenised with OLMoE's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 50304
  m.d_model = 2048
  m.num_layers = 16
  m.num_heads = 16
  m.num_kv_heads = 16
  m.d_ff = 1024
  m.max_seq_len = 4096
  m.rope_theta = 10000.0
  m.qk_norm = 'full'
  m.tie_embeddings = False
  m.norm_eps = 1e-5
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # 16 identical blocks: compile one

  e = m.moe
  e.num_experts = 64
  e.top_k = 8
  e.d_expert = 1024
  e.norm_topk_prob = False
  e.aux_loss_weight = 0.01
  e.z_loss_weight = 0.001
  # capacity_factor stays at 1.25, the measured fast path; OLMoE was trained dropless
  # (--config.model.moe.capacity_factor=0 to match it when fine-tuning).

  # 64 experts over 8 expert ranks (8 each), which also split the batch; the rest is FSDP.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 8

  t = config.train
  t.steps = 1_220_000  # ~5.1T tokens at 4M tokens per step, OLMoE's pretraining budget
  t.batch_size = 1024  # sequences: 4M tokens per step
  t.seq_len = 4096
  t.learning_rate = 4e-4
  t.warmup_steps = 2500  # ~10B tokens
  t.min_lr_ratio = 0.125  # 5e-5
  t.remat = 'save_dots'  # keep matmul outputs, recompute the cheap elementwise ops
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 1000
  t.permanent_every = 50_000
  return config
