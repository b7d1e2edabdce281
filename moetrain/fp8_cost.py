"""What `model.fp8` changes in the cost model, by formula: the share of a step's FLOPs that run
in FP8 matmuls (at the chip's FP8 peak) and the width of the expert weights gathered over FSDP.

The stand-in step is compiled without FP8 (`cost_model.step_cost`), as it is without FP8
dispatch: quantisation adds only elementwise work, and its matmuls and collectives are those of
the bf16 step. From it:
- FLOPs: the hand count's hardware FLOPs (`cost_model.hand_flops`) split into the FP8 matmuls
  (projections, dense MLPs, shared experts; routed experts on every capacity slot) and the rest
  (router, output layer, shared-expert gate, attention scores and sums), each part with its
  rematerialised forward pass; the compiled per-device FLOPs split in that ratio, the FP8 part
  at `Chip.matmul_flops(fp8=True)` (the bf16 rate on a chip without FP8 units).
- Bytes: under expert parallelism each expert block's model-dimension shards are quantised
  before their FSDP gather and gathered at one byte a value, plus a float32 scale per 128×128
  tile (blockwise; tensorwise scales are not gathered); where blockwise tiles would straddle the
  shards the masters are gathered instead (`parallel.fp8.gathered_weight`). The gradients'
  reduce-scatters and every other collective keep their width.
Activations are estimated as without FP8 (`summary.activation_bytes`): the saved float8
operands shrink only what a block keeps when it is not rematerialised.
"""

from moetrain import quantize, summary


def fp8_flops(config, hardware_flops: float) -> float:
  """FLOPs of one train step in FP8 matmuls, all devices: `hardware_flops` (the hand count of
  what the step computes, `cost_model.hand_flops`) less what stays in model.dtype. 0 without
  `model.fp8`."""
  m, t = config.model, config.train
  if m.fp8 == 'none':
    return 0.0
  tokens = t.batch_size * t.seq_len
  counts = summary.parameter_counts(m)
  # Per token: every matmul weight but the FP8 ones (the router, the output layer, gates), and
  # the attention scores and weighted sums, which flops_per_token adds to the weights' 6 each.
  other = summary.flops_per_token(m, t.seq_len, counts) - 6.0 * counts['fp8']
  attention = summary.flops_per_token(m, t.seq_len, counts) - 6.0 * summary.matmul_weights(
      m, counts)
  # As cost_model.hand_flops counts the rematerialised forward passes:
  if t.remat == 'full':  # every block's forward runs twice: all but the output layer's
    output_layer = 6.0 * m.d_model * m.vocab_size
    other += (other - output_layer) / 3
  elif t.remat == 'save_dots':  # dots with batch dimensions rerun: attention's stay bf16
    other += attention / 3
  return hardware_flops - other * tokens


def fp8_fraction(config, hand_flops) -> float:
  """The share of one train step's FLOPs in FP8 matmuls; `hand_flops(config)` counts the
  step's ('hardware': what it computes), `cost_model.hand_flops`."""
  if config.model.fp8 == 'none':
    return 0.0
  hardware_flops = hand_flops(config)['hardware']
  return fp8_flops(config, hardware_flops) / hardware_flops


def gathered_width(config, mesh: dict) -> float | None:
  """Bytes per value of an expert weight gathered over FSDP in FP8 on a mesh of these
  (resolved) axis sizes, or None where the experts' gathers keep their width (no recipe, no
  expert parallelism, nothing to gather, blockwise tiles straddling the shards)."""
  m = config.model
  fsdp = mesh.get('fsdp', 1)
  if m.fp8 == 'none' or mesh.get('expert', 1) == 1 or fsdp == 1 or not m.moe.num_experts:
    return None
  block = quantize.RECIPES[m.fp8].block
  if not block:
    return 1.0
  if (m.d_model // fsdp) % block:
    return None
  return 1.0 + 4.0 / block**2


def gather_scale(collective, width: float | None) -> float | None:
  """The factor from `collective`'s bytes as compiled (without FP8) to those it moves when it
  is an FSDP gather of expert weights (a float all-gather in the exchange's shard_map) made in
  FP8 at `width` bytes a value (`gathered_width`); None for any other."""
  if (width is None or collective.kind != 'all-gather' or '/shard_map/' not in collective.op_name
      or collective.dtype not in ('f32', 'bf16')):
    return None
  return width / {'f32': 4, 'bf16': 2}[collective.dtype]


def compute_seconds(flops: float, fp8_fraction: float, chip) -> float:
  """Seconds of `flops` at `chip`'s peak, `fp8_fraction` of them at its FP8 matmul rate."""
  return (flops * (1 - fp8_fraction) / chip.peak_flops
          + flops * fp8_fraction / chip.matmul_flops(fp8=True))

