"""Matmul FLOPs, memory traffic and collectives of a compiled (per-device) HLO module, with
every loop body counted as often as it runs.

XLA's `cost_analysis()` counts the body of a while loop once, so a scanned 58-layer stack
reports one layer. This module reads the optimized HLO text instead: each computation's dot
FLOPs, the bytes its top-level instructions read and write, and its collectives, multiplied by
how many times the computation runs (the product of the `known_trip_count`s of the loops
around it). Each collective keeps its replica groups (the devices it spans) and the JAX
operation it came from, so its bytes can be split by the links they cross (`link_bytes`).
"""

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ('all-to-all', 'all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute')
_WIDTHS = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
           'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
           'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_WIDTHS) + r')\[([0-9,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')
# Instructions that move no data of their own.
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'after-all',
         'partition-id', 'replica-id', 'while', 'call', 'conditional'}


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(text)]


def _bytes(arrays) -> int:
  return sum(_WIDTHS[dtype] * math.prod(dims) for dtype, dims in arrays)


@dataclasses.dataclass
class Collective:
  kind: str
  dtype: str  # element type of the (first) array it moves
  result_bytes: int  # per device, the op's result
  groups: list[list[int]]  # device ids of each replica group (a permute's source-target pairs)
  op_name: str = ''  # the JAX operation it lowers, from its metadata ('…/shard_map/all_to_all')

  @property
  def group_size(self) -> int:
    return len(self.groups[0]) if self.groups else 1

  @property
  def devices(self) -> list[int]:
    """Every device id it spans, all groups together."""
    return sorted({device for group in self.groups for device in group})

  def nodes(self, node_of) -> int:
    """The most nodes one of its groups spans; `node_of[device]` is the node of a device id."""
    return max((len({node_of[device] for device in group}) for group in self.groups), default=1)

  def bytes_sent(self, width_scale: float = 1.0) -> float:
    """Bytes one device sends (ring algorithms; its own share of the data not counted)."""
    n, size = self.group_size, self.result_bytes * width_scale
    return {'all-to-all': size * (n - 1) / n, 'all-gather': size * (n - 1) / n,
            'reduce-scatter': size * (n - 1), 'all-reduce': 2 * size * (n - 1) / n,
            'collective-permute': size}[self.kind]

  def link_bytes(self, node_of, width_scale: float = 1.0) -> dict[str, float]:
    """`bytes_sent` split into what stays inside the sender's node ('intra') and what crosses
    to other nodes ('inter'). An all-to-all sends every peer its share directly, so the split
    follows where the peers sit (for the device with the most peers off its node, which the
    others wait for). A ring whose group leaves a node runs as NCCL runs it: one ring per
    channel, each entering and leaving every node once through a different device's network
    link, so a group with g members on each node sends 1/g of its bytes across nodes from each
    device and the rest over the fast links (g = 1: every hop crosses; the node with fewest
    members sets the pace)."""
    sent = self.bytes_sent(width_scale)
    if self.nodes(node_of) == 1:
      return {'intra': sent, 'inter': 0.0}
    if self.kind == 'all-to-all':
      off_node = max(sum(node_of[peer] != node_of[device] for peer in group)
                     for group in self.groups for device in group)
      inter = sent * off_node / (self.group_size - 1)
    elif self.kind == 'collective-permute':
      inter = sent
    else:
      inter = sent / min(int(count) for group in self.groups
                         for count in np.unique(node_of[group], return_counts=True)[1])
    return {'intra': sent - inter, 'inter': inter}


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  operands: list  # names
  result: list  # (dtype, dims) of each array it produces
  callee: str | None = None  # a fusion's computation


@dataclasses.dataclass
class Computation:
  dot_flops: float = 0.0
  collectives: list = dataclasses.field(default_factory=list)
  calls: list = dataclasses.field(default_factory=list)  # (callee, times per call, fused)
  instructions: list = dataclasses.field(default_factory=list)
  parameters: list = dataclasses.field(default_factory=list)  # names, in order


def replica_groups(attributes: str) -> list[list[int]]:
  """Device-id groups from any of HLO's three spellings ({{0,1},{2,3}}, [2,2]<=[4], mesh[…])."""
  listed = re.search(r'replica_groups=\{((?:\{[0-9,]*\},?)*)\}', attributes)
  if listed:
    return [[int(i) for i in group.split(',') if i]
            for group in re.findall(r'\{([0-9,]*)\}', listed.group(1))]
  iota = re.search(r'replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?', attributes)
  if iota:
    shape, dims = [int(i) for i in iota.group(1).split(',')], [int(i) for i in
                                                              iota.group(2).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(i) for i in iota.group(3).split(',')])
    return ids.reshape(shape[0], -1).tolist()
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes)
  if mesh:
    axes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    grouped = [names.index(a) for a in re.findall(r"'(\w+)'", mesh.group(2))]
    order = [i for i in range(len(names)) if i not in grouped] + grouped
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(order)
    return ids.reshape(-1, math.prod(sizes[i] for i in grouped)).tolist()
  return []


def _source_target_pairs(attributes: str) -> list[list[int]]:
  listed = re.search(r'source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}', attributes)
  return [[int(i) for i in pair.split(',')]
          for pair in re.findall(r'\{([0-9,]+)\}', listed.group(1))] if listed else []


def _dot_flops(result: str, operands: str, attributes: str, shapes: dict) -> float:
  (_, out_dims), = _arrays(result)
  lhs = re.match(r'\s*%?([\w.\-]+)', operands).group(1)
  contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', attributes)
  lhs_dims = shapes[lhs][1]
  size = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(',') if i) \
      if contracting else 1
  return 2.0 * math.prod(out_dims) * size


def parse(hlo_text: str) -> tuple[dict[str, Computation], str, dict]:
  """(computations by name, name of the entry computation, (dtype, dims) of every array by
  name) of an HLO module's text."""
  computations, entry, current, shapes = {}, None, None, {}
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), Computation())
      if line.startswith('ENTRY'):
        entry = header.group(1)
      for name, spec in re.findall(r'([\w.\-]+): ([^,()]+\[[0-9,]*\])', header.group(2)):
        shapes[name] = _arrays(spec)[0]
      current.parameters = re.findall(r'([\w.\-]+): ', header.group(2))
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, result, opcode, rest = match.groups()
    result_arrays = _arrays(result)
    if len(result_arrays) == 1:
      shapes[name] = result_arrays[0]
    operands = rest.split('), ')[0]
    attributes = rest[len(operands):]
    if opcode == 'dot':
      current.dot_flops += _dot_flops(result, operands, attributes, shapes)
    fusion = re.search(r'calls=%([\w.\-]+)', attributes) if opcode == 'fusion' else None
    current.instructions.append(Instruction(name, opcode, re.findall(r'%([\w.\-]+)', operands),
                                            result_arrays, fusion and fusion.group(1)))
    if opcode in COLLECTIVES:
      op_name = re.search(r'op_name="([^"]*)"', attributes)
      current.collectives.append(Collective(
          opcode, result_arrays[0][0], _bytes(result_arrays),
          replica_groups(attributes) or _source_target_pairs(attributes),
          op_name.group(1) if op_name else ''))
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
    for key, callee in re.findall(r'\b(body|condition|calls|to_apply|branch_computations)='
                                  r'\{?%([\w.\-]+)', attributes):
      if key == 'to_apply' and opcode != 'call':
        continue  # reductions' and sorts' scalar functions
      times = int(trips.group(1)) if trips and key == 'body' else 1
      current.calls.append((callee, times, opcode == 'fusion'))
  return computations, entry, shapes


_SLICES = ('dynamic-slice', 'slice', 'gather')


def _parameter_reads(computation: Computation) -> list[float | None]:
  """Bytes a fused computation reads of each parameter: only the slices taken where every
  use is a slice, nothing where it is updated in place, else None (all of it)."""
  reads = []
  for parameter in computation.parameters:
    users = [(i, ins.operands.index(parameter)) for i, ins in enumerate(computation.instructions)
             if parameter in ins.operands]
    if users and all(computation.instructions[i].opcode in _SLICES and position == 0
                     for i, position in users):
      reads.append(float(sum(_bytes(computation.instructions[i].result) for i, _ in users)))
    elif users and all(computation.instructions[i].opcode == 'dynamic-update-slice'
                       and position == 0 for i, position in users):
      reads.append(0.0)
    else:
      reads.append(None)
  return reads


def _in_place_write(computation: Computation, shapes: dict) -> float | None:
  """Bytes written by a fused computation whose result is an in-place slice update."""
  root = computation.instructions[-1]
  while root.opcode in ('bitcast', 'copy') and root.operands:
    root = next((i for i in computation.instructions if i.name == root.operands[0]), root)
    if root.opcode not in ('bitcast', 'copy', 'dynamic-update-slice'):
      return None
  if root.opcode == 'dynamic-update-slice':
    return float(_bytes([shapes[root.operands[1]]]))
  return None


def _bytes_accessed(instruction: Instruction, computations: dict, shapes: dict) -> float:
  """What one top-level instruction reads and writes in memory, as XLA's cost analysis
  counts it: slices read only what they take, in-place updates write only the update."""
  if instruction.opcode in _FREE:
    return 0.0
  operands = [shapes.get(o) for o in instruction.operands]
  written = float(_bytes(instruction.result))
  if instruction.opcode in _SLICES:
    return 2 * written + _bytes([a for a in operands[1:] if a])
  if instruction.opcode == 'dynamic-update-slice':
    return 2.0 * _bytes([operands[1]]) + _bytes([a for a in operands[2:] if a])
  reads = [None] * len(operands)
  callee = computations.get(instruction.callee)
  if callee is not None:
    reads = _parameter_reads(callee)
    written = _in_place_write(callee, shapes) or written
  return written + sum(_bytes([array]) if read is None else read
                       for array, read in zip(operands, reads) if array)


def multipliers(computations: dict[str, Computation], entry: str) -> dict[str, tuple[int, bool]]:
  """How many times each computation runs per step, and whether it is fused (its
  instructions' memory traffic is its fusion's, not their own)."""
  counts = collections.defaultdict(int)
  fused = {}

  def visit(name, times, inside_fusion):
    counts[name] += times
    fused[name] = inside_fusion
    for callee, trips, is_fusion in computations[name].calls:
      if callee in computations:
        visit(callee, times * trips, inside_fusion or is_fusion)
  visit(entry, 1, False)
  return {name: (count, fused[name]) for name, count in counts.items()}


@dataclasses.dataclass
class ModuleStats:
  dot_flops: float  # every matmul, loops counted as often as they run
  dot_flops_once: float  # loop bodies once, as XLA's cost analysis counts them
  bytes_accessed: float
  bytes_accessed_once: float
  collectives: list  # (Collective, times per step)


def module_stats(hlo_text: str) -> ModuleStats:
  """Per-device totals of one compiled module's text (`compiled.as_text()`)."""
  computations, entry, shapes = parse(hlo_text)
  stats = ModuleStats(0.0, 0.0, 0.0, 0.0, [])
  for name, (times, fused) in multipliers(computations, entry).items():
    computation = computations[name]
    stats.dot_flops += times * computation.dot_flops
    stats.dot_flops_once += computation.dot_flops
    if not fused:
      accessed = sum(_bytes_accessed(i, computations, shapes) for i in computation.instructions)
      stats.bytes_accessed += times * accessed
      stats.bytes_accessed_once += accessed
    stats.collectives += [(c, times) for c in computation.collectives]
  return stats
