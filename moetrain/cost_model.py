"""What a config's train step costs on a target accelerator, without running it there.

The real train step is lowered and compiled for a mesh of CPU devices standing in for the
target's (`jax.jit(...).lower(abstract state).compile()`, nothing allocated; without FP8, which
`fp8_cost` models from it), and read back:
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
compute at peak or HBM traffic at full bandwidth, whichever is longer, plus the communication
left exposed. The HBM term is the traffic no implementation avoids (weights, gradients and
optimizer state read and written, saved activations written and read back), not XLA:CPU's bytes
accessed, which reflect the CPU's fusion decisions and float32 dots and are reported only for
reference.

Every collective's bytes are split by link class (`hlo_stats.Collective.link_bytes`, from its
replica groups and the chip's nodes): inside a node (NVLink, ICI) or between nodes (InfiniBand,
DCN). The expert exchange (the MoE layers' all-to-alls) is modelled by `exchange_model`: the
chunk pipeline of `model.moe.exchange_chunks` and each way of running it; the other
collectives count in full (not overlapped: an upper bound).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import exchange_model, fp8_cost, hardware, hlo_stats, summary
from moetrain.models.plan import routed_layer_count
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
  # node size -> role ('exchange', or a collective kind for the rest) -> link -> bytes sent
  link_bytes: dict
  exchange: exchange_model.Exchange | None  # None without expert parallelism
  xla_memory: dict  # memory_analysis(): argument, output, alias, temp, peak
  estimated_memory: dict  # summary.memory_per_device (params and optimizer exact)
  # Of the FLOPs, those in FP8 matmuls (model.fp8, `fp8_cost`).
  fp8_fraction: float = dataclasses.field(default=0.0, kw_only=True)

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


def _role(collective) -> str:
  """'exchange' for the MoE layers' all-to-alls (inside their shard_map), else the kind: GSPMD
  adds all-to-alls of its own to reshard other activations."""
  exchange = collective.kind == 'all-to-all' and '/shard_map/' in collective.op_name
  return 'exchange' if exchange else collective.kind


def _compile(flat, devices) -> tuple:
  """The stand-in step of `flat` compiled on `devices`, read back: (mesh, compile seconds,
  XLA's cost analysis, `hlo_stats.module_stats`, XLA's memory analysis, the memory estimate)."""
  mesh = make_mesh(flat, devices)
  setup = make_setup(flat, mesh)
  with jax.set_mesh(mesh):
    state, batch = abstract_inputs(setup)
    start = time.perf_counter()
    compiled = make_train_step(setup).lower(state, batch).compile()
    seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  memory = compiled.memory_analysis()
  xla_memory = {name: float(getattr(memory, f'{name}_size_in_bytes'))
                for name in ('argument', 'output', 'alias', 'temp')}
  xla_memory['peak'] = (xla_memory['argument'] + xla_memory['output'] - xla_memory['alias']
                        + xla_memory['temp'])
  return (mesh, seconds, cost[0] if isinstance(cost, list) else cost,
          hlo_stats.module_stats(compiled.as_text()), xla_memory,
          summary.memory_per_device(setup, state))


_COMPILED = {}  # (stand-in config, devices) -> `_compile`'s result


def step_cost(config, devices=None) -> StepCost:
  """Compiles `config`'s train step for `devices` (default: all) and reads its costs. Its
  expert exchange compiles flat, in one chunk, and without FP8, its scan not unrolled:
  stand-in CPU devices share no nodes and need not quantise, chunks and unrolling move the same
  bytes, and every way to run the exchange is modelled from the flat one's bytes
  (`exchange_model.exchange_cost`; `exchange` keeps the config's own settings), FP8 matmuls
  from the bf16 step (`fp8_cost`). Configs that differ only there share one compilation (held
  for this process)."""
  flat = config.copy_and_resolve_references()
  moe = flat.model.moe
  moe.exchange_chunks, moe.exchange_nodes, moe.exchange_dtype = 1, 1, ''
  flat.model.fp8, flat.model.scan_unroll = 'none', 1
  devices = tuple(devices or jax.devices())
  key = (flat.to_json(), devices)
  if key not in _COMPILED:
    _COMPILED[key] = _compile(flat, devices)
  mesh, seconds, cost, stats, xla_memory, estimated_memory = _COMPILED[key]
  widths = _collective_widths(config.model)
  fp8_width = fp8_cost.gathered_width(config, dict(mesh.shape))
  sent, largest = {}, {}
  node_maps = {chip.node_size: hardware.node_map(mesh.size, chip.node_size)
               for chip in hardware.CHIPS.values()}
  links = {size: {} for size in node_maps}
  for collective, times in stats.collectives:
    scale = widths[collective.kind] / 4 if collective.dtype == 'f32' else 1.0
    scale = fp8_cost.gather_scale(collective, fp8_width) or scale
    sent[collective.kind] = sent.get(collective.kind, 0.0) + times * collective.bytes_sent(scale)
    largest[collective.kind] = max(largest.get(collective.kind, 1), collective.group_size)
    for size, node_of in node_maps.items():
      role = links[size].setdefault(_role(collective), dict.fromkeys(hardware.LINKS, 0.0))
      for link, value in collective.link_bytes(node_of, scale).items():
        role[link] += times * value
  return StepCost(
      devices=mesh.size, mesh=dict(mesh.shape), tokens=config.train.batch_size *
      config.train.seq_len, compile_seconds=seconds,
      xla_flops=float(cost['flops']),
      flops=float(cost['flops']) + stats.dot_flops - stats.dot_flops_once,
      xla_bytes_accessed=float(cost['bytes accessed']),
      bytes_accessed=(float(cost['bytes accessed']) + stats.bytes_accessed
                      - stats.bytes_accessed_once),
      collective_bytes=sent, collective_groups=largest, link_bytes=links,
      exchange=(exchange_model.exchange_shape(config, dict(mesh.shape))
                if any(_role(c) == 'exchange' for c, _ in stats.collectives) else None),
      xla_memory=xla_memory, estimated_memory=estimated_memory,
      fp8_fraction=fp8_cost.fp8_fraction(config, hand_flops))


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
  moe_layers = routed_layer_count(m)
  expert_flops_per_slot = 6.0 * 3 * m.d_model * (moe.d_expert or m.d_ff)
  routed = expert_flops_per_slot * min(moe.top_k, moe.num_experts) * tokens * moe_layers
  groups = t.batch_size // moe.group_size
  slots = (expert_flops_per_slot * exchange_model.routed_rows(moe, t.seq_len) * groups
           * moe_layers)
  hardware_flops = model_flops - routed + slots
  output_layer = 6.0 * m.d_model * m.vocab_size * tokens
  if t.remat == 'full':  # every block's forward (a third of its train FLOPs) runs twice
    hardware_flops += (hardware_flops - output_layer) / 3
  elif t.remat == 'save_dots':  # dots with batch dimensions (attention, experts) rerun
    attention = model_flops - 6.0 * summary.matmul_weights(m, counts) * tokens
    hardware_flops += (attention + slots) / 3
  return {'model': model_flops, 'hardware': hardware_flops}


def _others_s(cost: StepCost, chip: hardware.Chip) -> dict:
  """Seconds of every collective but the exchange, by role, at link bandwidth (one after
  another: each link class's bytes at its own bandwidth, added up)."""
  return {role: sum(sent[link] / chip.bandwidth(link) for link in sent)
          for role, sent in cost.link_bytes[chip.node_size].items() if role != 'exchange'}


def _with_exchange(cost, chip, variant=None) -> tuple[dict | None, float]:
  """(the exchange's row run as `variant`, default as configured; seconds of communication
  exposed in the step)."""
  others = sum(_others_s(cost, chip).values())
  exchange = cost.exchange
  if exchange is None:
    return None, others
  variant = variant or exchange_model.Variant('as configured', exchange.chunks, exchange.fp8,
                                              exchange.two_level, exchange.overlap)
  row = exchange_model.exchange_cost(exchange, cost.link_bytes[chip.node_size]['exchange'], chip,
                                     variant)
  return row, others + row['exposed_s']


def roofline(cost: StepCost, model_flops: float, chip: hardware.Chip) -> dict:
  """Step time and MFU of `cost` on `chip` (one per stand-in device), its exchange run as
  configured; the other collectives not overlapped."""
  compute = fp8_cost.compute_seconds(cost.flops, cost.fp8_fraction, chip)
  memory = cost.minimum_traffic / chip.hbm_bandwidth
  collectives = _others_s(cost, chip)
  exchange, exposed = _with_exchange(cost, chip)
  if exchange:
    collectives['exchange'] = exchange['link_s']
  links = {link: sum(sent[link] for sent in cost.link_bytes[chip.node_size].values())
           for link in hardware.LINKS}
  step = max(compute, memory) + exposed
  return {'chip': chip.name, 'compute_s': compute, 'memory_s': memory,
          'collective_s': collectives, 'link_bytes': links, 'exchange': exchange,
          'exposed_comm_s': exposed, 'step_s': step,
          'overlapped_step_s': max(compute, memory, *collectives.values()),
          'mfu': model_flops / (cost.devices * chip.peak_flops * step),
          'tokens_per_s': cost.tokens / step,
          'fits': cost.estimated_memory['total'] <= chip.hbm_bytes}


def exchange_variants(cost: StepCost, chip: hardware.Chip) -> list[dict]:
  """The step on `chip` with its exchange run each way of `exchange_model.VARIANTS`: the
  exchange's bytes per link class and seconds (`exchange_model.exchange_cost`), with the
  communication exposed in the step
  (`exposed_comm_s`: the other collectives in full) and the step time. Empty without an
  exchange."""
  if cost.exchange is None:
    return []
  compute = max(fp8_cost.compute_seconds(cost.flops, cost.fp8_fraction, chip),
                cost.minimum_traffic / chip.hbm_bandwidth)
  rows = []
  for variant in exchange_model.VARIANTS:
    row, exposed = _with_exchange(cost, chip, variant)
    rows.append({**row, 'exposed_comm_s': exposed, 'step_s': compute + exposed})
  return rows


def flops_ratio(cost: StepCost, hand: dict) -> float:
  """XLA's trip-corrected FLOPs (all devices) over the hand count of the hardware FLOPs."""
  return cost.flops * cost.devices / hand['hardware']
