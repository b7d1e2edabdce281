"""The expert exchange of a train step on a target accelerator: its shape, each way to run it
(flat, in chunks of the experts or of the whole block, two-level, FP8) and the seconds it
takes and leaves exposed (`exchange_cost`), from the bytes the compiled flat exchange sends
per link class (`cost_model.step_cost`). Formulas in the docstrings, checked by hand in
tests/test_cost_model.py.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moetrain import hardware, hlo_stats, summary
from moetrain.models import layout, routing, two_level
from moetrain.models.block import Block
from moetrain.models.plan import layer_plan
from moetrain.parallel.mesh import AXES, BATCH_AXES

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
  overlap: str = 'experts'  # model.moe.exchange_overlap
  # The MoE blocks' other matmuls and attention of one forward pass (all pipelines): what
  # chunks of the whole block hide their exchange behind besides the experts.
  block_flops: float = 0.0
  unrolled: int = 1  # MoE layers one scan iteration runs (all of them without a scan)

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


def routed_rows(moe, seq_len: int) -> int:
  """Rows the experts compute per dispatch group: its [E, C] capacity slots, or (dropless) its
  tokens' k choices."""
  group_tokens = moe.group_size * seq_len
  if moe.num_experts and moe.capacity_factor > 0:
    return moe.num_experts * routing.expert_capacity(group_tokens, moe.top_k, moe.num_experts,
                                                     moe.capacity_factor, moe.min_capacity)
  return group_tokens * min(moe.top_k, moe.num_experts)


def all_to_all_bytes(config, expert_parallel: int, batch_shards: int) -> float:
  """Bytes one device sends in all-to-alls per step, by the analytic formula: its
  capacity_factor·T_local·k token vectors (the [E, C] buffers; dropless: its T_local·k rows,
  as the ragged exchange of GPUs and TPUs sends them) go to the other EP−1 ranks' experts and
  come back, forward and backward (and once more forward when rematerialised)."""
  m, t = config.model, config.train
  local_groups = t.batch_size // m.moe.group_size // batch_shards
  rows = local_groups * routed_rows(m.moe, t.seq_len)
  buffer = rows * m.d_model * jnp.dtype(m.dtype).itemsize
  passes = 2 * (2 + (t.remat != 'none'))
  _, moe_layers, _, _ = layer_plan(m)
  return buffer * (expert_parallel - 1) / expert_parallel * passes * moe_layers


def moe_block_weights(model_config) -> int:
  """Matmul weights one token multiplies by in an MoE block besides its routed experts:
  attention, router, shared experts."""
  block = nnx.eval_shape(lambda: Block(model_config, True, rngs=nnx.Rngs(0)))
  weights = layout.flatten(nnx.to_pure_dict(nnx.state(block, nnx.Param)))
  return sum(math.prod(w.shape) for name, w in weights.items()
             if w.ndim >= 2 and not name.endswith(summary.EXPERT_WEIGHTS))


def exchange_shape(config, mesh: dict) -> Exchange:
  """The expert exchange of `config`'s train step on a mesh of these axis sizes (resolved)."""
  m, t = config.model, config.train
  moe = m.moe
  microbatches = t.get('microbatches', 1)
  groups = t.batch_size // moe.group_size // math.prod(mesh[a] for a in BATCH_AXES)
  _, moe_layers, _, _ = layer_plan(m)
  rows = groups * routed_rows(moe, t.seq_len) * moe_layers
  tokens = groups * moe.group_size * t.seq_len * moe_layers
  per_token = 2.0 * (moe_block_weights(m) + t.seq_len * summary.attention_width(m))
  block_flops = tokens * per_token / mesh['tensor']
  return Exchange(
      mesh=dict(mesh), dispatch_groups=groups // microbatches, chunks=moe.exchange_chunks,
      fp8=moe.exchange_dtype == 'float8_e4m3fn', two_level=moe.exchange_nodes != 1,
      node_aware=moe.capacity_factor > 0 and moe.router != 'expert_choice',
      pipelines=moe_layers * microbatches, forward_passes=1 + (t.remat != 'none'),
      expert_flops=2.0 * 3 * m.d_model * (moe.d_expert or m.d_ff) * rows / mesh['tensor'],
      width=jnp.dtype(m.dtype).itemsize, top_k=moe.top_k, num_experts=moe.num_experts,
      num_groups=moe.num_groups, topk_groups=moe.topk_groups, fp8_matmuls=m.fp8 != 'none',
      overlap=moe.exchange_overlap, block_flops=block_flops,
      unrolled=min(m.scan_unroll, moe_layers) if m.scan_layers else moe_layers)


def chunk_pipeline(dispatch_s: float, compute_s: float, combine_s: float, chunks: int,
                   latency_s: float = 0.0, before_s: float = 0.0, after_s: float = 0.0,
                   layers: int = 1) -> float:
  """Seconds of one MoE layer pass whose exchange runs in `chunks` independent chunks (of
  `layers` such passes one after another, when the chunks of the whole block run through
  consecutive layers without waiting for each other: an unrolled scan, `model.scan_unroll`).

  Chunk i's dispatch (u = dispatch_s/n + latency_s) and combine (w = combine_s/n + latency_s)
  share the link; its experts (v = compute_s/n) the chip, and wait for its dispatch; its
  combine waits for its experts. With chunks of the whole block (`exchange_overlap=block`) the
  chip also runs each chunk's share of `before_s` ahead of its dispatch (attention, router,
  shared experts) and of `after_s` after its combine (their backward). Each resource takes the
  stages in order, every chunk's before the next stage's (dispatching every chunk first, then
  combining each as its experts finish). Without work before or after, that schedule's length
        T(n) = max(n·(u + w),       the link busy throughout;
                   u + n·v + w,     the chip, after the first dispatch and before the last combine;
                   n·u + v + w,     every dispatch, then the last chunk's experts and combine;
                   u + v + n·w)     the first chunk's dispatch and experts, then every combine
  is the best schedule's: each term bounds any order of the work from below. With dispatch =
  combine = a, compute c and no latency, the exposed exchange T(n) − c is max(2a/n, 2a − c):
  one chunk's way in and out, which nothing hides, or the link's whole load beyond the
  experts', whichever is longer (one chunk: 2a, nothing overlaps). Work before and after hides
  the first dispatch and the last combine too, and the link's load beyond the experts' up to
  its own length; over several layers, a chunk's combine also hides behind the other chunks'
  work of the next layer.
  """
  stages = [('chip', before_s / chunks), ('link', dispatch_s / chunks + latency_s),
            ('chip', compute_s / chunks), ('link', combine_s / chunks + latency_s),
            ('chip', after_s / chunks)] * layers
  free, done = {'chip': 0.0, 'link': 0.0}, [0.0] * chunks
  for resource, seconds in stages:
    if seconds:
      for i in range(chunks):
        done[i] = free[resource] = max(free[resource], done[i]) + seconds
  return max(done)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A way to run the expert exchange."""
  name: str
  chunks: int = 1  # 0: the divisor of the dispatch groups that hides most (`exchange_cost`)
  fp8: bool = False  # forward dispatch in float8 with per-block scales
  two_level: bool = False  # once per destination node, then fanned out inside it (capacity)
  overlap: str = 'experts'  # model.moe.exchange_overlap: what the chunks' exchange overlaps


VARIANTS = (Variant('flat'), Variant('overlapped', chunks=0), Variant('two-level', two_level=True),
            Variant('fp8', fp8=True), Variant('combined', 0, fp8=True, two_level=True),
            Variant('block', 0, overlap='block'),
            Variant('combined, block', 0, fp8=True, two_level=True, overlap='block'))


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
  link_s = lambda scales: max(scales[link] * one[link] / chip.bandwidth(link) for link in one)
  # FP8 dispatch: two levels quantise the rows that cross nodes, which travel on inside the
  # node in the activation dtype (`models.two_level`).
  ratio = fp8_ratio(exchange.width) if variant.fp8 else 1.0
  ratios = {'intra': 1.0 if two_levels else ratio, 'inter': ratio}
  dispatch_s, wide_s = link_s(ratios), link_s(dict.fromkeys(one, 1.0))
  latency = chip.latency('inter' if nodes > 1 else 'intra')
  compute = exchange.expert_flops / exchange.pipelines / chip.matmul_flops(exchange.fp8_matmuls)
  # Chunks of the whole block: their attention, router and shared experts at the bf16 peak.
  rest = exchange.block_flops / exchange.pipelines / chip.peak_flops
  rest = rest if variant.overlap == 'block' else 0.0
  # Chunks of the whole block keep apart across the layers an iteration unrolls.
  layers = exchange.unrolled if variant.overlap == 'block' else 1
  forward = chunk_pipeline(dispatch_s, compute, wide_s, chunks, latency, before_s=rest,
                           layers=layers) / layers - rest
  backward = chunk_pipeline(wide_s, 2 * compute, wide_s, chunks, latency,  # in bf16
                            after_s=2 * rest, layers=layers) / layers - 2 * rest
  passes = exchange.forward_passes
  sent = {link: (alls - passes * (1 - r)) / alls for link, r in ratios.items()}
  return {'variant': variant.name, 'chunks': chunks, 'nodes': nodes,
          'bytes': {'intra': intra * sent['intra'], 'inter': inter * sent['inter']},
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
  auto = Variant('auto', 0, exchange.fp8, exchange.two_level, exchange.overlap)
  return exchange_cost(exchange, flat, chip, auto)['chunks']


def resolve_exchange_chunks(config, mesh) -> None:
  """Sets `model.moe.exchange_chunks=0` (auto) to `best_exchange_chunks` for `mesh` and its
  chips, before the model is built; a set count stays."""
  if not config.model.moe.exchange_chunks:
    chip = hardware.chip_for_device(mesh.devices.flat[0].device_kind)
    config.model.moe.exchange_chunks = best_exchange_chunks(config, dict(mesh.shape), chip)
