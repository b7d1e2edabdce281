"""DeepSeek-V3: 671B parameters (without its 14B multi-token-prediction module), multi-head
latent attention, 256 routed experts top-8 plus a shared expert (37B active).

Architecture numbers are those of the released model's Hugging Face config.json
(deepseek-ai/DeepSeek-V3): 61 layers of width 7168, the first 3 dense (SwiGLU width 18432), the
other 58 MoE; 128 MLA heads with a 1536-rank query latent and a 512-rank key/value latent,
128 + 64 (rotary) query/key channels and 128 value channels per head; 256 routed experts of
width 2048 and 1 shared expert of the same width, sigmoid affinities, the top-8 experts taken
from the best 4 of 8 groups, weights renormalised and scaled by 2.5, auxiliary-loss-free bias
balancing; a 129280-token vocabulary with untied embeddings; RMSNorm epsilon 1e-6; RoPE base
10000 with YaRN (factor 40 over a 4096-token pretraining context, beta_fast 32, beta_slow 1,
mscale = mscale_all_dim = 1) for 163840 positions. `moetrain.convert.families.config_from_hf`
gives the same `model` section from that file (tests/test_configs.py checks it), except for the
multi-token-prediction module (`num_nextn_predict_layers: 1`): it is off here, so that the
modelled figures of docs/benchmarks.md hold as measured; `--config.model.mtp_layers=1` adds it
(with or without pipeline stages), with the report's loss weight 0.3 (0.1 after 10T tokens).

The train section follows the DeepSeek-V3 report (arXiv 2412.19437) where moetrain can: init std
0.006, AdamW (0.9, 0.95, weight decay 0.1) at 2.2e-4 after 2000 warmup steps, 4096-token
sequences, bias update speed 0.001, sequence-wise balance loss 1e-4, no z-loss. Its batch ramp
ends at 15360 sequences; 16384 is used here, which splits evenly over power-of-two pods. The
report's constant-then-cosine schedule is approximated by a cosine down to 10%. The data
section stays at the default (the embedded corpus): a real run needs a data source tokenised
with DeepSeek-V3's tokenizer.
"""

from moetrain.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.vocab_size = 129280
  m.d_model = 7168
  m.num_layers = 61
  m.num_heads = 128
  m.num_kv_heads = 128  # MLA has no shared key/value heads; kept equal to num_heads
  m.d_ff = 18432  # the 3 leading dense blocks
  m.max_seq_len = 163840  # the released (YaRN-extended) context; training below uses 4096
  m.rope_theta = 10000.0
  r = m.rope_scaling
  r.type = 'yarn'
  r.factor = 40.0
  r.original_max_seq_len = 4096
  r.beta_fast = 32.0
  r.beta_slow = 1.0
  r.mscale = 1.0
  r.mscale_all_dim = 1.0
  m.attention = 'mla'
  m.q_lora_rank = 1536
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.tie_embeddings = False
  m.norm_eps = 1e-6
  m.init_std = 0.006  # the report's init; config.json's initializer_range says 0.02
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.scan_layers = True  # one scanned stack of 3 dense blocks, one of 58 MoE blocks

  e = m.moe
  e.num_experts = 256
  e.top_k = 8
  e.d_expert = 2048
  e.num_shared_experts = 1
  e.d_shared_expert = 2048
  e.router = 'sigmoid'
  e.norm_topk_prob = True
  e.routed_scaling_factor = 2.5
  e.num_groups = 8
  e.topk_groups = 4
  e.first_dense_layers = 3
  e.bias_update_rate = 1e-3
  e.aux_loss = 'sequence'
  e.aux_loss_weight = 1e-4
  e.z_loss_weight = 0.0
  # capacity_factor stays at 1.25, the measured fast path; DeepSeek-V3 drops no tokens
  # (--config.model.moe.capacity_factor=0 to match it when fine-tuning).

  # 64-way expert parallelism (4 experts per rank), as in the report's training; the rest is
  # FSDP. The expert ranks also split the batch.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.expert = 64

  t = config.train
  t.steps = 220_000  # ~14.8T tokens at 67M tokens per step, the report's budget
  t.batch_size = 16384  # sequences
  t.seq_len = 4096
  t.learning_rate = 2.2e-4
  t.warmup_steps = 2000
  t.min_lr_ratio = 0.1  # 2.2e-5
  t.microbatches = 4  # bounds activations: on 1024 devices, 16 sequences each, 4 at a time
  t.remat = 'full'
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 500
  t.permanent_every = 10_000
  return config
