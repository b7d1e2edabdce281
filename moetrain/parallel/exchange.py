"""The exchange: the seam of the MoE pipeline where rows travel to their experts' owners.

An exchange is chosen once, from the mesh the run holds (`for_mesh`), and handed to the MoE
pipeline, which calls it at two points: on the way to the experts and on the way back.
- `Local` (no mesh, or one that does not split experts) moves nothing; the pipeline runs on
  global arrays and GSPMD splits whatever the mesh splits.
- `ExpertParallel` runs the pipeline inside `jax.shard_map` over the whole mesh: each device
  routes its own dispatch groups (capacity and dropping stay per group, so they never depend
  on the mesh), sends every expert's rows to the device that owns it, computes its own
  experts on what arrives (FSDP shards gathered, hidden units split over 'tensor') and sends
  the results home. Capacity buffers travel by `all_to_all`; dropless rows by a ragged
  exchange that sends every owner exactly its experts' rows (`ragged_exchange`).
  With `wire_dtype` float8_e4m3fn the tokens travel to the experts quantised (`fp8`: per-token
  scales over blocks of 128 channels) and are dequantised on arrival; the results going home
  and every gradient travel in the activation dtype (the quantisation passes gradients
  straight through). On one device nothing travels, so `Local` has no wire dtype.

Shape suffixes: G dispatch groups, E experts, C capacity, D model dim, L = E / P local experts
on each of P expert ranks, M rows sent, R = P·M rows a rank can receive.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from moetrain.errors import ConfigError
from moetrain.parallel import fp8, sharding
from moetrain.parallel import mesh as mesh_lib
from moetrain.parallel.ragged_exchange import NATIVE_BACKENDS, ragged_exchange


def for_mesh(mesh: Mesh | None, moe_config=None):
  """The exchange a model on `mesh` uses: `ExpertParallel` when it splits the experts.
  `moe_config` (a model.moe section; None: the defaults) picks how tokens travel
  (`exchange_*` fields); `exchange_dtype` has no effect on a mesh that does not split them."""
  if mesh is None or mesh.shape.get('expert', 1) == 1:
    return LOCAL
  return ExpertParallel(mesh, native=mesh.devices.flat[0].platform in NATIVE_BACKENDS,
                        wire_dtype=moe_config.exchange_dtype if moe_config is not None else '')


@dataclasses.dataclass(frozen=True)
class Local:
  """One participant: every stage sees all experts and all rows; nothing moves."""

  def run(self, fn, token_arrays, expert_weights):
    """`fn(token_arrays, expert_weights)` on the whole batch."""
    return fn(token_arrays, expert_weights)

  def buffers_to_experts(self, x_GxExCxD):
    return x_GxExCxD

  def buffers_from_experts(self, y_GxExCxD):
    return y_GxExCxD

  def rows_to_experts(self, x_MxD, counts_E):
    """Rows sorted by expert → (rows by local expert, their group sizes, the way back)."""
    return x_MxD, counts_E, None

  def rows_from_experts(self, y_MxD, way_back):
    del way_back
    return y_MxD

  def expert_weights(self, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    return w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD

  def quantized_expert_weights(self, recipe, *weights):
    """Float8 copies made ahead of the matmuls: none here, where nothing is gathered."""
    del recipe
    return (None,) * len(weights)

  def sum_hidden(self, partial):
    """Adds up the contributions of the ranks that split the hidden units (none here)."""
    return partial


LOCAL = Local()


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def _tiled_all_to_all(x, plan, *, split_axis, concat_axis):
  del plan  # buffers need none: every device sends every peer the same share
  return jax.lax.all_to_all(x, 'expert', split_axis, concat_axis, tiled=True)


_BUFFERS_OUT = functools.partial(_tiled_all_to_all, split_axis=1, concat_axis=0)
_BUFFERS_HOME = functools.partial(_tiled_all_to_all, split_axis=0, concat_axis=1)


def _ragged(rows_MxW, plan, *, num_out: int, native: bool):
  """`ragged_exchange` of rows (any dtype, any width) into [num_out, W] zeros by `plan` =
  (input offsets, send sizes, output offsets, receive sizes)."""
  zeros_OxW = jnp.zeros((num_out, rows_MxW.shape[1]), rows_MxW.dtype)
  return ragged_exchange(rows_MxW, zeros_OxW, *plan, 'expert', native=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_dispatch(send, send_back, x_NxD, plan, back_plan):
  """`send(x, plan)` with x quantised to float8 on the wire, dequantised to x's dtype on
  arrival; its gradient is the cotangent sent home unquantised by `send_back(ct, back_plan)`,
  the transpose of the exchange (straight through the quantisation)."""
  return fp8.from_wire(send(fp8.to_wire(x_NxD), plan), x_NxD.shape[-1], x_NxD.dtype)


def _fp8_dispatch_fwd(send, send_back, x_NxD, plan, back_plan):
  return _fp8_dispatch(send, send_back, x_NxD, plan, back_plan), back_plan


def _fp8_dispatch_bwd(send, send_back, back_plan, cotangent):
  return send_back(cotangent, back_plan), None, None  # the plans are integers


_fp8_dispatch.defvjp(_fp8_dispatch_fwd, _fp8_dispatch_bwd)


def _gather_fsdp(w, axis: int):
  """The whole `axis` of an FSDP-sharded weight block (its gradient is reduce-scattered)."""
  if jax.lax.axis_size('fsdp') == 1:
    return w
  return jax.lax.all_gather(w, 'fsdp', axis=axis, tiled=True)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Experts split over the mesh's 'expert' axis; `native` uses `ragged_all_to_all` (GPU,
  TPU) rather than its dense emulation (XLA:CPU has no ragged_all_to_all); `wire_dtype`
  carries the tokens to the experts in the activation dtype ('') or float8_e4m3fn."""
  mesh: Mesh
  native: bool = False
  wire_dtype: str = ''

  def __post_init__(self):
    if self.wire_dtype not in ('', 'float8_e4m3fn'):
      raise ConfigError(f"model.moe.exchange_dtype={self.wire_dtype!r}: expected '' or "
                        'float8_e4m3fn')

  def run(self, fn, token_arrays, expert_weights):
    """`fn(token_arrays, expert_weights)` on every device's dispatch groups (the leading axis
    of each token array) and its blocks of (w_gate, w_up, w_down)."""
    batch = sharding.spec(self.mesh, 'batch')
    weights_in = sharding.manual_spec(self.mesh, *sharding.EXPERT_IN_AXES)
    weights_out = sharding.manual_spec(self.mesh, *sharding.EXPERT_OUT_AXES)
    # Pipeline stages run this under a vmap over 'stage', whose batching of shard_map does not
    # type the constants built inside (scan carries, receive buffers) as varying over 'stage':
    # there the exchange goes unchecked (the tests hold its values to the single device's).
    staged = mesh_lib.stages(self.mesh) > 1
    return jax.shard_map(fn, mesh=self.mesh,
                         in_specs=(batch, (weights_in, weights_in, weights_out)),
                         out_specs=batch, check_vma=not staged)(token_arrays, expert_weights)

  def buffers_to_experts(self, x_GxExCxD):
    """This device's buffers for all E experts → the slots of its own L experts from every
    device's groups: [P·G, L, C, D]."""
    return self.dispatch(_BUFFERS_OUT, _BUFFERS_HOME, x_GxExCxD, (), ())

  def buffers_from_experts(self, y_NxLxCxD):
    with jax.named_scope('combine'):
      return _BUFFERS_HOME(y_NxLxCxD, ())

  def dispatch(self, send, send_back, x_NxD, plan, back_plan):
    """`send(x, plan)` in the wire dtype; `send_back(y, back_plan)` is its inverse. Any
    exchange of token rows towards the experts goes through here (the two-level exchange's
    rows across nodes too)."""
    # Named, so that profiles and compiled HLO tell the two directions apart.
    with jax.named_scope('dispatch'):
      if not self.wire_dtype:
        return send(x_NxD, plan)
      return _fp8_dispatch(send, send_back, x_NxD, plan, back_plan)

  def rows_to_experts(self, x_MxD, counts_E):
    """This device's rows sorted by expert (counts_E of each) → (the rows of its L experts
    from every device, filed by local expert then sender [R, D]; their group sizes [L]; the
    way back). Nothing is dropped: the receive buffer fits every peer sending all its rows."""
    num_experts = counts_E.shape[0]
    peers = jax.lax.axis_size('expert')
    num_local = num_experts // peers
    me = jax.lax.axis_index('expert')
    # Everybody's counts: the offsets of both exchanges follow from them alone, so one small
    # all_gather replaces two offset exchanges.
    counts_PxE = jax.lax.all_gather(counts_E, 'expert')
    totals_PxL = jnp.sum(counts_PxE, axis=0).reshape(peers, num_local)
    expert_start_E = _exclusive_cumsum(totals_PxL, axis=1).reshape(num_experts)
    senders_before_PxE = _exclusive_cumsum(counts_PxE, axis=0)
    mine = lambda a_PxE: jax.lax.dynamic_slice_in_dim(a_PxE, me * num_local, num_local, axis=1)
    plan = (_exclusive_cumsum(counts_E, 0), counts_E, expert_start_E + senders_before_PxE[me],
            mine(counts_PxE).reshape(-1))
    # Slice s·L + l of the way back returns sender s's rows of my local expert l to where they
    # started in its sorted rows.
    back_plan = ((mine(expert_start_E[None, :]) + mine(senders_before_PxE)).reshape(-1),
                 mine(counts_PxE).reshape(-1),
                 mine(_exclusive_cumsum(counts_PxE, axis=1)).reshape(-1), counts_E)
    num_rows = x_MxD.shape[0]
    received_RxD = self.dispatch(
        functools.partial(_ragged, num_out=peers * num_rows, native=self.native),
        functools.partial(_ragged, num_out=num_rows, native=self.native), x_MxD, plan, back_plan)
    return received_RxD, totals_PxL[me], (back_plan, num_rows)

  def rows_from_experts(self, y_RxD, way_back):
    back_plan, num_rows = way_back
    with jax.named_scope('combine'):
      return _ragged(y_RxD, back_plan, num_out=num_rows, native=self.native)

  def expert_weights(self, w_gate_LxDxF, w_up_LxDxF, w_down_LxFxD):
    """This device's expert blocks with their FSDP-split model dimension gathered."""
    return (_gather_fsdp(w_gate_LxDxF, 1), _gather_fsdp(w_up_LxDxF, 1),
            _gather_fsdp(w_down_LxFxD, 2))

  def quantized_expert_weights(self, recipe, w_gate_LxDxF, w_up_LxDxF, w_down_LxFxD):
    """Under a `model.fp8` recipe, each expert block's float8 (q, scales), quantised before
    its FSDP gather and gathered at one byte a value (`fp8.gathered_weight`), or None where
    the matmul quantises the gathered master itself."""
    with jax.named_scope('fp8_weights'):
      return (fp8.gathered_weight(w_gate_LxDxF, 1, recipe),
              fp8.gathered_weight(w_up_LxDxF, 1, recipe),
              fp8.gathered_weight(w_down_LxFxD, 2, recipe))

  def sum_hidden(self, partial):
    """Each 'tensor' rank holds a slice of the hidden units: their contributions add up.
    Without a split there is nothing to sum, and no all-reduce: XLA would combine the no-op
    all-reduces of every exchange chunk into one, making each chunk wait on all chunks'
    experts."""
    if jax.lax.axis_size('tensor') == 1:
      return partial
    return jax.lax.psum(partial, 'tensor')
