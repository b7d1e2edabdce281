"""What a config's train step costs on a target accelerator, without running it there.

The real train step is lowered and compiled for a mesh of CPU devices standing in for the
target's (`jax.jit(...).lower(abstract state).compile()`, nothing allocated), and read back:
XLA's cost analysis (FLOPs, bytes accessed), its memory analysis (per-device peak) and the
optimized per-device HLO (collectives and loop trip counts, `hlo_stats`). Two corrections make
the CPU figures those of an accelerator:
- XLA counts a loop body once; matmul FLOPs and memory traffic inside loops (scanned layers,
  microbatches) are added back for every further trip.
- XLA:CPU computes bf16 dots and collectives in float32. Collectives count at the width they
  have on an accelerator: all-to-alls carry activations (`model.dtype`), the others parameters
  and their gradients (`model.param_dtype`). Memory is also estimated from shapes and
  shardings (`summary.memory_per_device`).
A roofline then turns the per-device work into a step time for a chip (`hardware.CHIPS`):
compute at peak or HBM traffic at full bandwidth, whichever is longer, plus the collectives at
link bandwidth (not overlapped: an upper bound on a well-overlapped step). The HBM term is the
traffic no implementation avoids (weights, gradients and optimizer state read and written,
saved activations written and read back), not XLA:CPU's bytes accessed, which reflect the
CPU's fusion decisions and float32 dots and are reported only for reference.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import hardware, hlo_stats, summary
from moetrain.models import routing
from moetrain.models.transformer import layer_plan
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, make_setup
from moetrain.steps import make_train_step


@dataclasses.dataclass
class StepCost:
  """Per-device figures of one train step (FLOPs, bytes) and the step's shape."""
  devices: int
  mesh: dict
  tokens: int  # per step, all devices
  compile_seconds: float
  xla_flops: float  # cost_analysis(), loop bodies once
  flops: float  # loop bodies counted per trip
  xla_bytes_accessed: float
  bytes_accessed: float
  collective_bytes: dict  # kind -> bytes one device sends per step
  collective_groups: dict  # kind -> largest group size seen
  collectives_in_domain: dict  # kind -> {domain size: whether every group fits in one domain}
  xla_memory: dict  # memory_analysis(): argument, output, alias, temp, peak
  estimated_memory: dict  # summary.memory_per_device (params and optimizer exact)

  @property
  def minimum_traffic(self) -> float:
    """HBM bytes per device and step that no implementation avoids: weights read in the
    forward and backward passes and by the update, and written; gradients written and read;
    optimizer state read and written; saved activations written and read back."""
    memory = self.estimated_memory
    return 6 * memory['params'] + 2 * memory['optimizer'] + 2 * memory['activations']


def abstract_inputs(setup):
  """The train step's arguments as ShapeDtypeStructs in their shardings."""
  t = setup.config.train
  tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32,
                                sharding=setup.batch_sharding)
  return abstract_state(setup), {'inputs': tokens, 'targets': tokens}


def _collective_widths(model_config) -> dict:
  compute, params = (np.dtype(jnp.dtype(d)).itemsize
                     for d in (model_config.dtype, model_config.param_dtype))
  return {kind: compute if kind == 'all-to-all' else params for kind in hlo_stats.COLLECTIVES}


def _in_domain(groups, domain_size: int) -> bool:
  return all(len({device // domain_size for device in group}) == 1 for group in groups)


def step_cost(config, devices=None) -> StepCost:
  """Compiles `config`'s train step for `devices` (default: all) and reads its costs."""
  mesh = make_mesh(config, devices)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    state, batch = abstract_inputs(setup)
    start = time.perf_counter()
    compiled = make_train_step(setup).lower(state, batch).compile()
    seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  stats = hlo_stats.module_stats(compiled.as_text())
  widths = _collective_widths(config.model)
  sent, largest, in_domain = {}, {}, {}
  domains = sorted({chip.domain_size for chip in hardware.CHIPS.values()})
  for collective, times in stats.collectives:
    dtype = collective.dtype
    scale = widths[collective.kind] / 4 if dtype == 'f32' else 1.0
    sent[collective.kind] = sent.get(collective.kind, 0.0) + times * collective.bytes_sent(scale)
    largest[collective.kind] = max(largest.get(collective.kind, 1), collective.group_size)
    fits = in_domain.setdefault(collective.kind, {d: True for d in domains})
    for d in domains:
      fits[d] = fits[d] and _in_domain(collective.groups, d)
  memory = compiled.memory_analysis()
  xla_memory = {name: float(getattr(memory, f'{name}_size_in_bytes'))
                for name in ('argument', 'output', 'alias', 'temp')}
  xla_memory['peak'] = (xla_memory['argument'] + xla_memory['output'] - xla_memory['alias']
                        + xla_memory['temp'])
  return StepCost(
      devices=mesh.size, mesh=dict(mesh.shape), tokens=config.train.batch_size *
      config.train.seq_len, compile_seconds=seconds,
      xla_flops=float(cost['flops']),
      flops=float(cost['flops']) + stats.dot_flops - stats.dot_flops_once,
      xla_bytes_accessed=float(cost['bytes accessed']),
      bytes_accessed=(float(cost['bytes accessed']) + stats.bytes_accessed
                      - stats.bytes_accessed_once),
      collective_bytes=sent, collective_groups=largest, collectives_in_domain=in_domain,
      xla_memory=xla_memory,
      estimated_memory=summary.memory_per_device(setup, state))


def hand_flops(config) -> dict:
  """FLOPs of one train step counted by hand, all devices together: 'model' (6 per active
  weight and token plus attention: what MFU divides by) and 'hardware' (what the step
  computes: routed experts on every capacity slot, and the forward pass again for
  rematerialised blocks)."""
  m, t = config.model, config.train
  tokens = t.batch_size * t.seq_len
  counts = summary.parameter_counts(m)
  model_flops = summary.flops_per_token(m, t.seq_len, counts) * tokens
  moe = m.moe
  _, moe_layers, _, _ = layer_plan(m)
  expert_flops_per_slot = 6.0 * 3 * m.d_model * (moe.d_expert or m.d_ff)
  routed = expert_flops_per_slot * min(moe.top_k, moe.num_experts) * tokens * moe_layers
  slots = routed
  if moe.num_experts and moe.capacity_factor > 0:
    group_tokens = moe.group_size * t.seq_len
    capacity = routing.expert_capacity(group_tokens, moe.top_k, moe.num_experts,
                                       moe.capacity_factor, moe.min_capacity)
    groups = tokens // group_tokens
    slots = expert_flops_per_slot * moe.num_experts * capacity * groups * moe_layers
  hardware_flops = model_flops - routed + slots
  output_layer = 6.0 * m.d_model * m.vocab_size * tokens
  if t.remat == 'full':  # every block's forward (a third of its train FLOPs) runs twice
    hardware_flops += (hardware_flops - output_layer) / 3
  elif t.remat == 'save_dots':  # dots with batch dimensions (attention, experts) rerun
    attention = model_flops - 6.0 * summary.matmul_weights(m, counts) * tokens
    hardware_flops += (attention + slots) / 3
  return {'model': model_flops, 'hardware': hardware_flops}


def all_to_all_bytes(config, expert_parallel: int, batch_shards: int) -> float:
  """Bytes one device sends in all-to-alls per step, by the analytic formula: its
  capacity_factor·T_local·k token vectors (the [E, C] buffers; dropless: its T_local·k rows,
  as the ragged exchange of GPUs and TPUs sends them) go to the other EP−1 ranks' experts and
  come back, forward and backward (and once more forward when rematerialised)."""
  m, t = config.model, config.train
  moe = m.moe
  group_tokens = moe.group_size * t.seq_len
  rows = group_tokens * moe.top_k
  if moe.capacity_factor > 0:
    rows = moe.num_experts * routing.expert_capacity(group_tokens, moe.top_k, moe.num_experts,
                                                     moe.capacity_factor, moe.min_capacity)
  local_groups = t.batch_size // moe.group_size // batch_shards
  buffer = local_groups * rows * m.d_model * jnp.dtype(m.dtype).itemsize
  passes = 2 * (2 + (t.remat != 'none'))
  _, moe_layers, _, _ = layer_plan(m)
  return buffer * (expert_parallel - 1) / expert_parallel * passes * moe_layers


def roofline(cost: StepCost, model_flops: float, chip: hardware.Chip) -> dict:
  """Step time and MFU of `cost` on `chip` (one per stand-in device)."""
  compute = cost.flops / chip.peak_flops
  memory = cost.minimum_traffic / chip.hbm_bandwidth
  links = {kind: sent / (chip.link_bandwidth
                         if cost.collectives_in_domain[kind][chip.domain_size]
                         else chip.network_bandwidth)
           for kind, sent in cost.collective_bytes.items()}
  step = max(compute, memory) + sum(links.values())
  return {'chip': chip.name, 'compute_s': compute, 'memory_s': memory,
          'collective_s': links, 'step_s': step,
          'overlapped_step_s': max(compute, memory, *links.values()),
          'mfu': model_flops / (cost.devices * chip.peak_flops * step),
          'tokens_per_s': cost.tokens / step,
          'fits': cost.estimated_memory['total'] <= chip.hbm_bytes}


def flops_ratio(cost: StepCost, hand: dict) -> float:
  """XLA's trip-corrected FLOPs (all devices) over the hand count of the hardware FLOPs."""
  return cost.flops * cost.devices / hand['hardware']
