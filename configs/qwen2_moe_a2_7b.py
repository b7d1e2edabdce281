"""Qwen1.5-MoE-A2.7B (Qwen2-MoE): 14.3B parameters, 60 fine-grained experts top-4 plus a gated
shared expert (2.7B active).

Architecture numbers are those of the released model's Hugging Face config.json
(Qwen/Qwen1.5-MoE-A2.7B): 24 layers of width 2048, 16 heads of width 128 (no GQA) with biases on
the query, key and value projections, 60 routed experts of width 1408 chosen 4 per token without
renormalising their softmax weights (`norm_topk_prob: false`), one shared expert of width 5632
whose output is scaled by sigmoid(x·w), a 151936-token vocabulary with untied embeddings, RoPE
base 1e6 over 8192 positions, RMSNorm epsilon 1e-6. `intermediate_size` (5632) is kept as the
dense width although every layer is MoE (`decoder_sparse_step: 1`). The auxiliary loss weight is
the config's `router_aux_loss_coef` (0.001). `moetrain.convert.families.config_from_hf` gives
the same `model` section from that file (tests/test_configs.py checks it).

The train section is a plausible recipe for a large pod (Qwen published none; the released
model was upcycled from Qwen-1.8B). The data section stays at the default (the embedded corpus):
a real run needs a data source tokenised with Qwen's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 151936
  m.d_model = 2048
  m.num_layers = 24
  m.num_heads = 16
  m.num_kv_heads = 16
  m.d_ff = 5632
  m.max_seq_len = 8192
  m.rope_theta = 1e6
  m.attention_bias = True  # Qwen's q/k/v biases
  m.tie_embeddings = False
  m.norm_eps = 1e-6
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # 24 identical blocks: compile one

  e = m.moe
  e.num_experts = 60
  e.top_k = 4
  e.d_expert = 1408
  e.num_shared_experts = 1
  e.d_shared_expert = 5632  # one wide shared expert (four experts' worth)
  e.shared_expert_gate = True
  e.norm_topk_prob = False
  e.aux_loss_weight = 0.001
  e.z_loss_weight = 0.0  # Qwen2-MoE trains without a router z-loss
  # capacity_factor stays at 1.25, the measured fast path; the released model was trained
  # dropless (--config.model.moe.capacity_factor=0 to match it when fine-tuning).

  # 60 experts split 4 ways (15 per device) on a power-of-two pod; the rest is FSDP.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 4

  t = config.train
  t.steps = 250_000  # ~1T tokens at 4M tokens per step
  t.batch_size = 1024  # sequences: 4M tokens per step
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
