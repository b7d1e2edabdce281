"""The node-aware two-level exchange: a token crosses the slow link between nodes (hosts, or
TPU slices) once per node that holds any of its experts, not once per expert.

When the mesh's 'expert' axis spans N nodes of Q = P / N consecutive expert ranks, the capacity
path of token choice runs in two levels, inside the same `shard_map` as `ExpertParallel`:
1. Home: every token that needs node n (has a real expert there) takes a row of node n's
   buffer [G, N, Cn, D], in token order (or priority order), Cn rows per group and node; the
   row carries the token's expert choices on that node (node-local ids, null elsewhere) and
   its gates. The rows travel to the device with the same local rank on node n (inter-node
   all_to_all: groups of the ranks q, Q + q, ...).
2. Node: the received rows are dispatch groups of their own, N·G of Cn rows, which the
   ordinary capacity pipeline (`pipeline.token_choice`) sends to the node's experts over the
   intra-node all_to_all (groups of Q consecutive ranks), computes, brings back and reduces
   to one gate-weighted partial sum per row; the partial sums travel home across nodes.
3. Home: each token adds up its nodes' partial sums (in float32; they travel in the
   activation dtype, as the experts' outputs do in the flat exchange).
The MoE pipeline hands its capacity path to `TwoLevel.token_choice`.

Dropping: a (token, node) pair beyond the node capacity Cn loses all of the token's experts
on that node; the surviving rows then meet the expert capacity C exactly as in the flat
exchange (a group's tokens that chose an expert all arrive in one received group, in the
flat exchange's order). So: two-level = flat routing after the node-capacity drops. When Cn
holds every token that needs the node, both exchanges keep the same assignments, expert
drops included. Cn follows the capacity factor (`node_capacity`).

Everything else (dropless rows, expert choice, the weights and the hidden-unit sum) is the
flat exchange's: those paths fall back to it. With `model.moe.exchange_dtype=float8_e4m3fn` the
token rows cross nodes quantised, as the flat exchange sends them (`ExpertParallel.dispatch`),
and travel on inside the node in the activation dtype; the partial sums go home unquantised.

Shape suffixes: G dispatch groups, T tokens per group, K experts per token, D model dim,
E experts, N nodes, Cn rows per node per group, S = N·Cn rows of a group's node buffer,
C expert capacity, R = N·G groups received on a node.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moetrain.errors import ConfigError
from moetrain.models import dispatch, pipeline
from moetrain.parallel import exchange


def _node_key(device):
  """What makes two devices share a node: the slice on TPU (the hosts of a slice share one
  ICI fabric), the process elsewhere (one process per host)."""
  if device.platform == 'tpu':
    return getattr(device, 'slice_index', 0)
  return device.process_index


def expert_nodes(devices: np.ndarray, configured: int = 0) -> int:
  """Nodes the expert axis (axis 2 of the mesh's devices) spans: `configured` if > 0, else
  from the devices, whose nodes must be equal runs of consecutive expert ranks."""
  if configured:
    return configured
  keys = np.vectorize(_node_key, otypes=[object])(devices)
  lines = np.moveaxis(keys, 2, -1).reshape(-1, keys.shape[2])
  peers, counts = lines.shape[1], set()
  for line in lines:
    firsts = {}
    ranks = np.array([firsts.setdefault(key, len(firsts)) for key in line])
    if peers % len(firsts) or (ranks != np.arange(peers) // (peers // len(firsts))).any():
      raise ConfigError(f'the expert axis must visit its nodes (hosts or slices) in equal runs '
                        f'of consecutive ranks, but its ranks sit on nodes {ranks.tolist()}: '
                        'reorder the devices or set model.moe.exchange_nodes')
    counts.add(len(firsts))
  if len(counts) > 1:
    raise ConfigError(f'the expert axis spans {sorted(counts)} nodes at different positions '
                      'of the mesh: set model.moe.exchange_nodes')
  return counts.pop()


def reachable_nodes(nodes: int, num_groups: int = 1, topk_groups: int = 1) -> int:
  """Most nodes one token's experts can span under group-limited routing (routing groups and
  nodes both split the experts into equal consecutive runs)."""
  if num_groups > 1 and num_groups % nodes == 0:  # whole groups on each node
    return min(nodes, topk_groups)
  if num_groups > 1 and nodes % num_groups == 0:  # each group over nodes / num_groups nodes
    return topk_groups * nodes // num_groups
  return nodes


def expected_nodes(k: int, experts_per_node: int, reachable: int) -> float:
  """Mean distinct nodes of k experts drawn uniformly from those of `reachable` nodes."""
  pool = reachable * experts_per_node
  k = min(k, pool)  # null experts (AdaMoE) fill the rest of a token's choices
  missed = math.comb(pool - experts_per_node, k) / math.comb(pool, k)
  return reachable * (1.0 - missed)


def node_capacity(capacity: int, tokens: int, k: int, num_experts: int, nodes: int,
                  reachable: int) -> int:
  """Rows per node per group, Cn: the node's E/N·C expert slots of a group, filled k/m at a
  time by a token that spans m = `expected_nodes` nodes, so ≈ cf·T·m/N for the capacity C
  of factor cf; at least 1, at most T."""
  m = expected_nodes(k, num_experts // nodes, reachable)
  # Rounding first, as `routing.expert_capacity` does, keeps float noise from adding a row.
  return min(tokens, max(1, math.ceil(round(capacity * num_experts * m / (nodes * k), 6))))


def node_slots(experts_GxTxK: jax.Array, mask_GxT: jax.Array, num_experts: int, nodes: int,
               capacity: int, priority_GxT: jax.Array | None = None):
  """Each token's row on every node it needs: -> (node or N when not needed, slot, kept),
  all [G, T, N]. Rows go in token order (or priority order), the first `capacity` kept."""
  real_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  node_GxTxK = jnp.where(real_GxTxK, experts_GxTxK // (num_experts // nodes), nodes)
  needs_GxTxN = jnp.any(node_GxTxK[..., None] == jnp.arange(nodes), axis=-2)
  # Node n as the n-th "choice" of every token that needs it: the capacity plan's
  # choice-major order then serves each node's tokens in token (or priority) order.
  node_GxTxN = jnp.where(needs_GxTxN, jnp.arange(nodes, dtype=jnp.int32), nodes)
  slots_GxTxN, kept_GxTxN = dispatch.assign_slots(node_GxTxN, mask_GxT, nodes, capacity,
                                                  priority_GxT=priority_GxT)
  return node_GxTxN, slots_GxTxN, kept_GxTxN


def _row_tokens(slots_GxTxN, kept_GxTxN, capacity):
  """The token of every node-buffer row, T for an empty one: -> [G, S]."""
  num_groups, tokens, nodes = slots_GxTxN.shape
  rows = nodes * capacity
  row_GxTxN = jnp.where(kept_GxTxN, jnp.arange(nodes) * capacity + slots_GxTxN, rows)
  token_GxTxN = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], row_GxTxN.shape)
  return jnp.full((num_groups, rows), tokens, jnp.int32).at[
      jnp.arange(num_groups)[:, None, None], row_GxTxN].set(token_GxTxN, mode='drop')


def _row_choices(experts_GxTxK, gates_GxTxK, token_GxS, num_experts, nodes, capacity):
  """Every row's choices on its own node: -> (node-local expert ids [G, S, K], the null id
  E/N where the choice is on another node or the row is empty; the token's gates [G, S, K])."""
  per_node = num_experts // nodes
  take = lambda a, fill: jnp.take_along_axis(a, token_GxS[..., None], axis=1, mode='fill',
                                             fill_value=fill)
  experts_GxSxK = take(experts_GxTxK, num_experts)
  row_node_Sx1 = (jnp.arange(nodes * capacity) // capacity)[:, None]
  here_GxSxK = (experts_GxSxK < num_experts) & (experts_GxSxK // per_node == row_node_Sx1)
  local_GxSxK = jnp.where(here_GxSxK, experts_GxSxK - row_node_Sx1 * per_node, per_node)
  # The ids travel in one byte when a node has few enough experts (the row's D values do not).
  wire = jnp.int8 if per_node < 128 else jnp.int32
  return local_GxSxK.astype(wire), take(gates_GxTxK.astype(jnp.float32), 0.0)


def _kept_choices(experts_GxTxK, real_GxTxK, slots_GxTxN, kept_GxTxN, kept_GxSxK, num_experts):
  """An assignment is kept when its token's row on the expert's node is, and the node kept
  the choice in that row: -> [G, T, K] bool."""
  num_groups, tokens, nodes = slots_GxTxN.shape
  k = experts_GxTxK.shape[-1]
  node_GxTxK = jnp.where(real_GxTxK, experts_GxTxK // (num_experts // nodes), 0)
  on_node = lambda a_GxTxN: jnp.take_along_axis(a_GxTxN, node_GxTxK, axis=2)
  row_GxTxK = node_GxTxK * (kept_GxSxK.shape[1] // nodes) + on_node(slots_GxTxN)
  entry_GxTxK = row_GxTxK * k + jnp.arange(k)
  node_kept_GxTxK = jnp.take_along_axis(kept_GxSxK.reshape(num_groups, -1),
                                        entry_GxTxK.reshape(num_groups, -1), axis=1,
                                        mode='fill', fill_value=0).reshape(num_groups, tokens, k)
  return real_GxTxK & on_node(kept_GxTxN) & (node_kept_GxTxK > 0)


def _to_nodes(a_GxSxW, nodes, inter):
  """This device's node buffers → the rows of every node's device of the same local rank
  for this one's node: [N·G, Cn, W], source node major."""
  num_groups, rows, width = a_GxSxW.shape
  a_RxCxW = jax.lax.all_to_all(a_GxSxW.reshape(num_groups, nodes, rows // nodes, width),
                               'expert', 1, 0, tiled=True, axis_index_groups=inter)
  return a_RxCxW.reshape(nodes * num_groups, rows // nodes, width)


def _home(a_RxCxW, nodes, inter):
  """The inverse of `_to_nodes`: [N·G, Cn, W] → [G, N·Cn, W]."""
  num_received, rows, width = a_RxCxW.shape
  a_GxNxCxW = jax.lax.all_to_all(a_RxCxW.reshape(num_received, 1, rows, width), 'expert', 0, 1,
                                 tiled=True, axis_index_groups=inter)
  return a_GxNxCxW.reshape(num_received // nodes, nodes * rows, width)


def _send_to_nodes(a_GxSxW, plan, *, nodes, inter):
  del plan  # node buffers need none
  return _to_nodes(a_GxSxW, nodes, inter)


def _send_home(a_RxCxW, plan, *, nodes, inter):
  del plan
  return _home(a_RxCxW, nodes, inter)


def intra_groups(peers: int, nodes: int) -> list[list[int]]:
  """Expert ranks by node: [[0 .. Q-1], [Q .. 2Q-1], ...]."""
  return np.arange(peers).reshape(nodes, -1).tolist()


def inter_groups(peers: int, nodes: int) -> list[list[int]]:
  """Expert ranks by local rank, one per node: [[0, Q, ...], [1, Q + 1, ...], ...]."""
  return np.arange(peers).reshape(nodes, -1).T.tolist()


@dataclasses.dataclass(frozen=True)
class IntraNode:
  """The exchange of stage 2, already inside the flat exchange's shard_map: buffers of a
  node's E/N experts travel among its Q ranks; weights and hidden sums as in `flat`."""
  flat: exchange.ExpertParallel
  groups: tuple

  def run(self, fn, token_arrays, expert_weights):
    return fn(token_arrays, expert_weights)

  def buffers_to_experts(self, x_RxExCxD):
    """[R, E/N, C, D] → the slots of this rank's L experts from the node: [Q·R, L, C, D]."""
    return jax.lax.all_to_all(x_RxExCxD, 'expert', 1, 0, tiled=True,
                              axis_index_groups=self.groups)

  def buffers_from_experts(self, y_NxLxCxD):
    return jax.lax.all_to_all(y_NxLxCxD, 'expert', 0, 1, tiled=True,
                              axis_index_groups=self.groups)

  def expert_weights(self, *weights):
    return self.flat.expert_weights(*weights)

  def quantized_expert_weights(self, recipe, *weights):
    return self.flat.quantized_expert_weights(recipe, *weights)

  def sum_hidden(self, partial):
    return self.flat.sum_hidden(partial)


@dataclasses.dataclass(frozen=True)
class TwoLevel:
  """The two-level capacity path over `flat` (an `ExpertParallel`) on `nodes` nodes, a token's
  experts spanning at most `reachable` of them; every other call goes to `flat`."""
  flat: exchange.ExpertParallel
  nodes: int
  reachable: int

  def __post_init__(self):
    peers = self.flat.mesh.shape['expert']
    if peers % self.nodes:
      raise ConfigError(f'model.moe.exchange_nodes={self.nodes} must divide mesh.expert={peers}')

  def __getattr__(self, name):
    # Everything but the capacity path (dropless rows, expert choice, the weights, the hidden
    # sum) is the flat exchange's. Not dunders, nor `flat` itself: copies and unpickling look
    # those up on an instance whose fields are not set yet.
    if name.startswith('__') or name == 'flat':
      raise AttributeError(name)
    return getattr(self.flat, name)

  def token_choice(self, x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, expert_weights, *,
                   num_experts: int, capacity: int, backend: str = 'capacity',
                   priority_GxT=None, chunks: int = 1, fp8: str = 'none'):
    """`pipeline.token_choice` with a capacity, in two levels: -> (y [G, T, D] in x's dtype,
    kept [G, T, K] bool)."""
    def per_device(arrays, weights):
      return self._capacity(*arrays, weights, num_experts=num_experts, capacity=capacity,
                            backend=backend, chunks=chunks, fp8=fp8)
    arrays = (x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, priority_GxT)
    return self.flat.run(per_device, arrays, expert_weights)

  def _capacity(self, x_GxTxD, experts_GxTxK, gates_GxTxK, mask_GxT, priority_GxT, weights, *,
                num_experts, capacity, backend, chunks, fp8):
    num_groups, tokens, _ = x_GxTxD.shape
    nodes, k = self.nodes, experts_GxTxK.shape[-1]
    peers = jax.lax.axis_size('expert')
    rows = node_capacity(capacity, tokens, k, num_experts, nodes, self.reachable)
    node_GxTxN, slots_GxTxN, kept_GxTxN = node_slots(experts_GxTxK, mask_GxT, num_experts,
                                                     nodes, rows, priority_GxT)
    x_GxNxCxD = dispatch.dispatch(x_GxTxD, node_GxTxN, slots_GxTxN, kept_GxTxN, nodes, rows,
                                  backend)
    token_GxS = _row_tokens(slots_GxTxN, kept_GxTxN, rows)
    local_GxSxK, gates_GxSxK = _row_choices(experts_GxTxK, gates_GxTxK, token_GxS, num_experts,
                                            nodes, rows)
    across = inter_groups(peers, nodes)
    to_nodes = lambda a_GxSxW: _to_nodes(a_GxSxW, nodes, across)
    # Rows arrive in the flat exchange's order within each source group, so the expert
    # capacity C per group keeps what the flat exchange keeps.
    intra = IntraNode(self.flat, tuple(map(tuple, intra_groups(peers, nodes))))
    send = functools.partial(_send_to_nodes, nodes=nodes, inter=across)
    send_home = functools.partial(_send_home, nodes=nodes, inter=across)
    x_RxCxD = self.flat.dispatch(send, send_home, x_GxNxCxD.reshape(num_groups, nodes * rows, -1),
                                 (), ())
    y_RxCxD, kept_RxCxK = pipeline.token_choice(
        x_RxCxD,
        to_nodes(local_GxSxK).astype(jnp.int32), to_nodes(gates_GxSxK),
        jnp.ones((nodes * num_groups, rows), jnp.float32), weights,
        num_experts=num_experts // nodes, capacity=capacity, backend=backend, exchange=intra,
        chunks=chunks, fp8=fp8)
    y_GxNxCxD = _home(y_RxCxD, nodes, across).reshape(num_groups, nodes, rows, -1)
    kept_GxSxK = _home(kept_RxCxK.astype(jnp.int8), nodes, across)
    # Weight 1 for every kept row (derived from this device's routing, so typed as varying).
    y_GxTxD = dispatch.combine(y_GxNxCxD, node_GxTxN, slots_GxTxN, kept_GxTxN,
                               kept_GxTxN.astype(jnp.float32), backend)
    real_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
    return y_GxTxD, _kept_choices(experts_GxTxK, real_GxTxK, slots_GxTxN, kept_GxTxN,
                                  kept_GxSxK, num_experts)


def node_aware(flat, moe_config=None):
  """`flat` (the exchange `exchange.for_mesh` picked), or the two-level exchange over it when
  its expert axis spans several nodes (`model.moe.exchange_nodes`, 0: from the devices)."""
  if not isinstance(flat, exchange.ExpertParallel):
    return flat  # nothing travels
  moe = moe_config or {}
  nodes = expert_nodes(flat.mesh.devices, moe.get('exchange_nodes', 0))
  if nodes == 1:
    return flat
  return TwoLevel(flat, nodes, reachable_nodes(nodes, moe.get('num_groups', 1),
                                               moe.get('topk_groups', 1)))
