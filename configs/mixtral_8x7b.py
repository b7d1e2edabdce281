"""Mixtral-8x7B-v0.1: 46.7B parameters, 8 SwiGLU experts per layer, top-2 (12.9B active).

Architecture numbers are those of the released model's Hugging Face config.json
(mistralai/Mixtral-8x7B-v0.1): 32 layers of width 4096, 32 query and 8 key/value heads of width
128, experts of width 14336, a 32000-token vocabulary with untied embeddings, RoPE base 1e6 over
32768 positions, RMSNorm epsilon 1e-5. Mixtral's softmax over the top-2 logits equals a softmax
over all experts renormalised over the chosen two (`norm_topk_prob`). The auxiliary loss weight
is the config's `router_aux_loss_coef` (0.02). `moetrain.convert.families.config_from_hf` gives
the same `model` section from that file (tests/test_configs.py checks it).

The train section is a plausible recipe for a large pod (Mistral published none). The data
section stays at the default (the embedded corpus): a real run needs a data source tokenised
with Mixtral's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.d_ff = 14336
  m.max_seq_len = 32768  # the released context; training below uses 4096
  m.rope_theta = 1e6
  m.tie_embeddings = False
  m.norm_eps = 1e-5
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # 32 identical blocks: compile one

  e = m.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 14336  # each expert is a full Mistral-7B-sized SwiGLU
  e.norm_topk_prob = True
  e.aux_loss_weight = 0.02
  e.z_loss_weight = 0.0  # Mixtral trains without a router z-loss
  # capacity_factor stays at 1.25, the measured fast path; the released model was trained
  # dropless (--config.model.moe.capacity_factor=0 to match it when fine-tuning).

  # One expert per device along `expert` (its 8 ranks also split the batch), the rest FSDP.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 8

  t = config.train
  t.steps = 250_000  # ~1T tokens at 4M tokens per step
  t.batch_size = 1024  # sequences: 4M tokens per step
  t.seq_len = 4096
  t.learning_rate = 3e-4
  t.warmup_steps = 2000
  t.min_lr_ratio = 0.1
  t.remat = 'full'  # 4096-token sequences through 32 wide blocks: recompute, don't store
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 1000
  t.permanent_every = 25_000
  return config
