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
DCN). The expert exchange (the MoE layers' all-to-alls) is modelled as the chunk pipeline of
`model.moe.exchange_chunks` (`chunk_pipeline`) and each way of running it (`VARIANTS`); the
other collectives count in full (not overlapped: an upper bound).
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import fp8_cost, hardware, hlo_stats, summary
from moetrain.models import routing, two_level
from moetrain.models.transformer import layer_plan
from moetrain.parallel.mesh import AXES, BATCH_AXES, make_mesh
from moetrain.state import abstract_state, make_setup
from moetrain.steps import make_train_step

# FP8 dispatch: one byte per channel and a float32 scale per token and 128-channel block.
FP8_SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Exchange:
  """The expert exchange of one train step, per device, as the chunk pipeline model sees it."""
  mesh: dict  # axis -> size
  dispatch_groups: int  # per device and microbatch; exchange_chunks must divide it
  chunks: int  # model.moe.exchange_chunks
  fp8: bool  # model.moe.exchange_dtype is float8_e4m3fn
  two_level: bool  # model.moe.exchange_nodes is not 1 (0: wherever the exchange spans nodes)
  node_aware: bool  # the capacity path of token choice, the one that runs in two levels
  pipelines: int  # MoE layers × microbatches: one pipeline each per pass
  forward_passes: int  # 2 when rematerialised (the exchange runs again)
  expert_flops: float  # routed experts' matmuls of one forward pass, all pipelines
  width: int  # bytes per element of the activations it carries (model.dtype)
  top_k: int
  num_experts: int
  num_groups: int  # group-limited routing
  topk_groups: int
  fp8_matmuls: bool = False  # model.fp8: the experts' matmuls at the chip's FP8 rate

  @property
  def groups(self) -> list[list[int]]:
    """Device ids of each group of the 'expert' axis: the exchange's replica groups."""
    sizes = [self.mesh.get(axis, 1) for axis in AXES]
    ids = np.moveaxis(np.arange(math.prod(sizes)).reshape(sizes), AXES.index('expert'), -1)
    return ids.reshape(-1, self.mesh['expert']).tolist()

  def nodes(self, node_size: int) -> int:
    """How many nodes of `node_size` devices one exchange group spans."""
    collective = hlo_stats.Collective('all-to-all', '', 0, self.groups)
    return collective.nodes(hardware.node_map(math.prod(self.mesh.values()), node_size))


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
  exchange: Exchange | None  # None without expert parallelism
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
  expert exchange compiles flat, in one chunk, and without FP8: stand-in CPU devices share no
  nodes and need not quantise, chunks move the same bytes, and every way to run the exchange is
  modelled from the flat one's bytes (`exchange_cost`; `exchange` keeps the config's own
  settings), FP8 matmuls from the bf16 step (`fp8_cost`). Configs that differ only there share
  one compilation (held for this process)."""
  flat = config.copy_and_resolve_references()
  moe = flat.model.moe
  moe.exchange_chunks, moe.exchange_nodes, moe.exchange_dtype = 1, 1, ''
  flat.model.fp8 = 'none'
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
      exchange=(exchange_shape(config, dict(mesh.shape))
                if any(_role(c) == 'exchange' for c, _ in stats.collectives) else None),
      xla_memory=xla_memory, estimated_memory=estimated_memory,
      fp8_fraction=fp8_cost.fp8_fraction(config, hand_flops))


def _routed_rows(moe, seq_len: int) -> int:
  """Rows the experts compute per dispatch group: its [E, C] capacity slots, or (dropless) its
  tokens' k choices."""
  group_tokens = moe.group_size * seq_len
  if moe.num_experts and moe.capacity_factor > 0:
    return moe.num_experts * routing.expert_capacity(group_tokens, moe.top_k, moe.num_experts,
                                                     moe.capacity_factor, moe.min_capacity)
  return group_tokens * min(moe.top_k, moe.num_experts)


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
  groups = t.batch_size // moe.group_size
  slots = expert_flops_per_slot * _routed_rows(moe, t.seq_len) * groups * moe_layers
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
  local_groups = t.batch_size // m.moe.group_size // batch_shards
  rows = local_groups * _routed_rows(m.moe, t.seq_len)
  buffer = rows * m.d_model * jnp.dtype(m.dtype).itemsize
  passes = 2 * (2 + (t.remat != 'none'))
  _, moe_layers, _, _ = layer_plan(m)
  return buffer * (expert_parallel - 1) / expert_parallel * passes * moe_layers


def exchange_shape(config, mesh: dict) -> Exchange:
  """The expert exchange of `config`'s train step on a mesh of these axis sizes (resolved)."""
  m, t = config.model, config.train
  moe = m.moe
  microbatches = t.get('microbatches', 1)
  groups = t.batch_size // moe.group_size // math.prod(mesh[a] for a in BATCH_AXES)
  _, moe_layers, _, _ = layer_plan(m)
  rows = groups * _routed_rows(moe, t.seq_len) * moe_layers
  return Exchange(
      mesh=dict(mesh), dispatch_groups=groups // microbatches, chunks=moe.exchange_chunks,
      fp8=moe.exchange_dtype == 'float8_e4m3fn', two_level=moe.exchange_nodes != 1,
      node_aware=moe.capacity_factor > 0 and moe.router != 'expert_choice',
      pipelines=moe_layers * microbatches, forward_passes=1 + (t.remat != 'none'),
      expert_flops=2.0 * 3 * m.d_model * (moe.d_expert or m.d_ff) * rows / mesh['tensor'],
      width=jnp.dtype(m.dtype).itemsize, top_k=moe.top_k, num_experts=moe.num_experts,
      num_groups=moe.num_groups, topk_groups=moe.topk_groups, fp8_matmuls=m.fp8 != 'none')


def chunk_pipeline(dispatch_s: float, compute_s: float, combine_s: float, chunks: int,
                   latency_s: float = 0.0) -> float:
  """Seconds of one MoE layer pass whose exchange runs in `chunks` independent chunks.

  Chunk i's dispatch (u = dispatch_s/n + latency_s) and combine (w = combine_s/n + latency_s)
  share the link; its experts (v = compute_s/n) the chip, and wait for its dispatch; its
  combine waits for its experts. Each resource has its whole load to do, and some chunk's work
  on the other stages that cannot overlap it:
    T(n) = max(n·(u + w),       the link busy throughout;
               u + n·v + w,     the chip, after the first dispatch and before the last combine;
               n·u + v + w,     every dispatch, then the last chunk's experts and combine;
               u + v + n·w).    the first chunk's dispatch and experts, then every combine.
  Each term bounds any order of the work from below, and dispatching every chunk first, then
  combining each as its experts finish, attains the largest: T(n) is the best schedule. With
  dispatch = combine = a, compute c and no latency, the exposed exchange T(n) − c is
  max(2a/n, 2a − c): one chunk's way in and out, which nothing hides, or the link's whole load
  beyond the experts', whichever is longer (one chunk: 2a, nothing overlaps).
  """
  u, v, w = dispatch_s / chunks + latency_s, compute_s / chunks, combine_s / chunks + latency_s
  return max(chunks * (u + w), u + chunks * v + w, chunks * u + v + w, u + v + chunks * w)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A way to run the expert exchange."""
  name: str
  chunks: int = 1  # 0: the divisor of the dispatch groups that hides most (`exchange_cost`)
  fp8: bool = False  # forward dispatch in float8 with per-block scales
  two_level: bool = False  # once per destination node, then fanned out inside it (capacity)


VARIANTS = (Variant('flat'), Variant('overlapped', chunks=0), Variant('two-level', two_level=True),
            Variant('fp8', fp8=True), Variant('combined', 0, fp8=True, two_level=True))


def destination_nodes(exchange: Exchange, nodes: int) -> float:
  """Mean distinct nodes a token's top-k experts live on, experts and routing groups both in
  equal consecutive runs over `nodes` nodes: the k drawn uniformly from the experts of the R
  nodes group-limited routing lets a token reach, R·(1 − C(p − p/R, k) / C(p, k)) with p
  those experts, as the two-level exchange sizes its buffers (`models.two_level`)."""
  reachable = two_level.reachable_nodes(nodes, exchange.num_groups, exchange.topk_groups)
  return two_level.expected_nodes(exchange.top_k, exchange.num_experts // nodes, reachable)


def fp8_ratio(width: int) -> float:
  """FP8 bytes on the wire over those of `width`-byte activations: 1 byte per channel plus a
  float32 scale per 128 channels (0.516 for bf16)."""
  return (1 + 4 / FP8_SCALE_BLOCK) / width


def _exchange_at(exchange, flat, chip, variant, chunks) -> dict:
  nodes = exchange.nodes(chip.node_size)
  intra, inter = flat['intra'], flat['inter']
  two_levels = variant.two_level and exchange.node_aware and nodes > 1
  if two_levels:
    # Inter-node: one copy per token and destination node instead of one per expert. Inside
    # the node every copy goes once to its expert's device over the fast links.
    ranks = exchange.mesh['expert']
    local = ranks // nodes
    buffer = (intra + inter) * ranks / (ranks - 1)
    intra = buffer * (local - 1) / local
    inter *= destination_nodes(exchange, nodes) / min(exchange.top_k, exchange.num_experts)
  alls = 2 * (exchange.forward_passes + 1)  # all-to-alls per pipeline: in and out, each pass
  one = {'intra': intra / alls / exchange.pipelines, 'inter': inter / alls / exchange.pipelines}
  # The two link classes carry their shares at the same time.
  link_s = lambda scale: max(scale * one[link] / chip.bandwidth(link) for link in one)
  # The two-level exchange sends its rows in the activation dtype (`models.two_level`).
  ratio = fp8_ratio(exchange.width) if variant.fp8 and not two_levels else 1.0
  dispatch_s, wide_s = link_s(ratio), link_s(1.0)
  latency = chip.latency('inter' if nodes > 1 else 'intra')
  compute = exchange.expert_flops / exchange.pipelines / chip.matmul_flops(exchange.fp8_matmuls)
  forward = chunk_pipeline(dispatch_s, compute, wide_s, chunks, latency)
  backward = chunk_pipeline(wide_s, 2 * compute, wide_s, chunks, latency)  # in bf16
  passes = exchange.forward_passes
  sent = (alls - passes * (1 - ratio)) / alls
  return {'variant': variant.name, 'chunks': chunks, 'nodes': nodes,
          'bytes': {'intra': intra * sent, 'inter': inter * sent},
          'link_s': exchange.pipelines * (passes * (dispatch_s + wide_s) + 2 * wide_s),
          'exposed_s': exchange.pipelines * (passes * (forward - compute) + backward - 2 * compute)}


def exchange_cost(exchange: Exchange, flat: dict, chip: hardware.Chip, variant: Variant) -> dict:
  """The expert exchange of one step run as `variant` on `chip`, from the bytes one device
  sends in the flat exchange per link class (`flat`): bytes per link class, seconds on the
  links, seconds exposed (not hidden behind the experts), nodes one exchange spans and chunks
  (`variant.chunks`, or the divisor of the dispatch groups with the least exposed)."""
  if variant.chunks:
    return _exchange_at(exchange, flat, chip, variant, variant.chunks)
  groups = exchange.dispatch_groups
  divisors = [n for n in range(1, groups + 1) if groups % n == 0]
  return min((_exchange_at(exchange, flat, chip, variant, n) for n in divisors),
             key=lambda row: (row['exposed_s'], row['chunks']))


def _split_by_link(exchange: Exchange, sent: float, node_size: int) -> dict:
  """`sent` split by link class as the exchange's groups place its peers."""
  shares = hlo_stats.Collective('all-to-all', '', 1, exchange.groups).link_bytes(
      hardware.node_map(math.prod(exchange.mesh.values()), node_size))
  return {link: sent * share / sum(shares.values()) for link, share in shares.items()}


def best_exchange_chunks(config, mesh: dict, chip: hardware.Chip | None) -> int:
  """The `model.moe.exchange_chunks` (a divisor of each device's dispatch groups per
  microbatch) that leaves the least of `config`'s expert exchange exposed on `chip`, for a
  mesh of these (resolved) axis sizes: analytic, no compilation. 1 without expert parallelism
  or on an unknown chip (a CPU)."""
  expert = mesh.get('expert', 1)
  if chip is None or expert == 1 or not config.model.moe.num_experts:
    return 1
  exchange = exchange_shape(config, mesh)
  shards = math.prod(mesh[axis] for axis in BATCH_AXES)
  flat = _split_by_link(exchange, all_to_all_bytes(config, expert, shards), chip.node_size)
  auto = Variant('auto', 0, exchange.fp8, exchange.two_level)
  return exchange_cost(exchange, flat, chip, auto)['chunks']


def resolve_exchange_chunks(config, mesh) -> None:
  """Sets `model.moe.exchange_chunks=0` (auto) to `best_exchange_chunks` for `mesh` and its
  chips, before the model is built; a set count stays."""
  if not config.model.moe.exchange_chunks:
    chip = hardware.chip_for_device(mesh.devices.flat[0].device_kind)
    config.model.moe.exchange_chunks = best_exchange_chunks(config, dict(mesh.shape), chip)


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
  variant = variant or Variant('as configured', exchange.chunks, exchange.fp8, exchange.two_level)
  row = exchange_cost(exchange, cost.link_bytes[chip.node_size]['exchange'], chip, variant)
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
  """The step on `chip` with its exchange run each way of `VARIANTS`: the exchange's bytes per
  link class and seconds (`exchange_cost`), with the communication exposed in the step
  (`exposed_comm_s`: the other collectives in full) and the step time. Empty without an
  exchange."""
  if cost.exchange is None:
    return []
  compute = max(fp8_cost.compute_seconds(cost.flops, cost.fp8_fraction, chip),
                cost.minimum_traffic / chip.hbm_bandwidth)
  rows = []
  for variant in VARIANTS:
    row, exposed = _with_exchange(cost, chip, variant)
    rows.append({**row, 'exposed_comm_s': exposed, 'step_s': compute + exposed})
  return rows


def flops_ratio(cost: StepCost, hand: dict) -> float:
  """XLA's trip-corrected FLOPs (all devices) over the hand count of the hardware FLOPs."""
  return cost.flops * cost.devices / hand['hardware']
