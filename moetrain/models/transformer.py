"""Decoder-only language model: embeddings, pre-norm blocks (dense or MoE), tied unembedding."""

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain.models.attention import Attention
from moetrain.models.block import Block
from moetrain.models.layers import KVCache, RMSNorm, param
from moetrain.models.mla import LatentAttention
from moetrain.models.mtp import MultiTokenPrediction, shift_left
from moetrain.models.plan import is_moe_layer, layer_plan, main_stack
from moetrain.models import routing_stats
from moetrain.parallel import mesh as mesh_lib, sharding, stages


def init_cache(model, batch: int, length: int) -> None:
  """Gives every attention layer of `model` an empty key/value cache of `length` positions
  (stacked like the layers' weights when they are scanned), for decoding token by token. The
  multi-token-prediction modules get none: decoding never runs them."""
  for path, module in nnx.iter_graph(model):
    if path[:1] == ('mtp',):
      continue
    if isinstance(module, (Attention, LatentAttention)):
      stacked = module.wo.shape[:-3]
      dtype = module.wo.dtype
      k_shape, v_shape = module.cache_shapes(batch, length)
      module.cache_k = KVCache(jnp.zeros(stacked + k_shape, dtype))
      module.cache_v = KVCache(jnp.zeros(stacked + v_shape, dtype))


def _append(layer_stats, more_stats):
  """The MoE layers' stacked stats followed by `more_stats` (stacked too; None: none)."""
  if more_stats is None:
    return layer_stats
  return jax.tree.map(lambda main, more: jnp.concatenate([main, more]), layer_stats, more_stats)


# `train.remat` → the `jax.checkpoint` policy of each block (None: no rematerialisation).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _rows(tokens_BxL, mask_BxL, segments_BxL, positions_BxL):
  """(positions, segments, mask) of the rows: all tokens real and positions 0, 1, … along each
  row unless given."""
  if mask_BxL is None:
    mask_BxL = jnp.ones(tokens_BxL.shape, jnp.bool_)
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[-1]), tokens_BxL.shape)
  return positions_BxL, segments_BxL, mask_BxL


class Unit(nnx.Module):
  """A run of consecutive blocks: the body of one scan step (dense blocks, then an MoE one)."""

  def __init__(self, blocks):
    self.blocks = nnx.List(blocks)


def stack_modules(modules, axis: str = 'layers', repeats: int = 1):
  """Modules of one structure → one module whose arrays gain a leading `axis` of their count,
  or with `repeats` > 1 two leading axes ('layer_repeats', `axis`) of [repeats, count/repeats]
  (the stack in order, row by row)."""
  graphdef, *_ = nnx.split(modules[0])
  states = [nnx.state(module) for module in modules]

  def stack(*variables):
    axes = variables[0].get_metadata().get('out_sharding') or (None,) * variables[0].ndim
    stacked = jnp.stack([v.get_value() for v in variables])
    if repeats > 1:
      return variables[0].replace(stacked.reshape((repeats, -1) + stacked.shape[1:]),
                                  out_sharding=('layer_repeats', axis, *axes))
    return variables[0].replace(stacked, out_sharding=(axis, *axes))
  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
  """The LM. `model(tokens_BxL)` gives float32 logits [B, L, vocab], routing dropless."""

  def __init__(self, config, *, rngs: nnx.Rngs, remat: str = 'none', mesh=None):
    """`remat` (`train.remat`) picks the `jax.checkpoint` policy applied to every block;
    `mesh` is the device mesh the model runs on (None: one device, or whatever GSPMD makes
    of the inputs' shardings); it fixes how the MoE layers exchange tokens."""
    self.embed = param(rngs, (config.vocab_size, config.d_model), ('vocab', 'embed'), config)
    blocks = [Block(config, is_moe_layer(config, i), rngs=rngs, mesh=mesh)
              for i in range(config.num_layers)]
    self.scan_layers = bool(config.get('scan_layers', False))
    self.scan_unroll = config.get('scan_unroll', 1)
    if remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r} must be one of {", ".join(REMAT_POLICIES)}')
    self.remat = remat
    if self.scan_layers:
      # Blocks are created in order as in the unscanned model (same parameters), then stacked.
      dense, units, length, tail = layer_plan(config)
      self.main = main_stack(config)
      self.repeats = config.pipeline_repeats
      stacked = lambda units, name: (stack_modules(units, 'stage_layers', self.repeats)
                                     if name == self.main else stack_modules(units))
      self.dense_stack = (stacked([Unit(blocks[i:i + 1]) for i in range(dense)], 'dense_stack')
                          if dense else None)
      self.moe_stack = (stacked([Unit(blocks[dense + u * length:dense + (u + 1) * length])
                                 for u in range(units)], 'moe_stack') if units else None)
      self.tail = nnx.List(blocks[len(blocks) - tail:] if tail else [])
      self.plan = (dense, units, length, tail)
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(config.d_model, config)
    self.unembed = (None if config.tie_embeddings else
                    param(rngs, (config.d_model, config.vocab_size), ('embed', 'vocab'), config))
    # Made last, so that the main model's parameters do not depend on them.
    self.mtp = (nnx.List([MultiTokenPrediction(config, config.num_layers + k, rngs=rngs,
                                               mesh=mesh)
                          for k in range(config.mtp_layers)]) if config.mtp_layers else None)
    self.num_experts = config.moe.num_experts
    self.num_layers = config.num_layers
    # Expert choice routes each token by comparing it with later tokens of its group.
    self.causal = not (config.moe.num_experts and config.moe.router == 'expert_choice')
    self.dtype = jnp.dtype(config.dtype)
    self.mesh = mesh
    self.stages = mesh_lib.stages(mesh)

  def __call__(self, tokens_BxL):
    return self.forward(tokens_BxL)[0]

  def forward(self, tokens_BxL, mask_BxL=None, capacity_factor: float = 0.0, *,
              train: bool = False, rng=None, segments_BxL=None, positions_BxL=None):
    """Logits [B, L, V] (float32) and the `RoutingStats` of the MoE layers, stacked.

    `mask_BxL` marks real tokens (padding is kept out of routing statistics and capacity);
    `capacity_factor` 0 routes dropless. `train=True` enables router jitter (drawn from
    `rng`). With `segments_BxL` (documents packed into a row, see `data.packing`) a token
    attends only within its own segment; `positions_BxL` default to 0, 1, … along each row.
    On a mesh with pipeline stages the inputs may be M microbatches, [M, B, L] (M a multiple
    of the stages): the main stack then runs as a pipeline over them (`parallel.stages`;
    microbatch m draws its jitter from `fold_in(rng, m)`), the logits are [M, B, L, V] and
    the stats those of the M microbatches combined by their declared reductions.
    """
    rows = _rows(tokens_BxL, mask_BxL, segments_BxL, positions_BxL)
    if tokens_BxL.ndim == 3:
      return self._pipelined(tokens_BxL, rows, capacity_factor, train, rng)
    x_BxLxD, layer_stats = self._hidden(tokens_BxL, (*rows, capacity_factor, train, rng))
    return self._logits(x_BxLxD), layer_stats

  def forward_mtp(self, tokens_BxL, mask_BxL, capacity_factor: float = 0.0, *,
                  train: bool = False, rng=None, segments_BxL=None, positions_BxL=None):
    """`forward` with the multi-token-prediction modules (`models.mtp`): (logits [B, L, V],
    logits of each depth [D, B, L, V], the stats of the main model's MoE layers followed by
    those of the MTP modules' MoE blocks). Depth k's logits at position i predict the token
    k places after position i's target; the last k positions of a row are masked out of its
    routing (their logits mean nothing)."""
    rows = _rows(tokens_BxL, mask_BxL, segments_BxL, positions_BxL)
    if tokens_BxL.ndim == 3:
      return self._pipelined(tokens_BxL, rows, capacity_factor, train, rng, predict=True)
    h_BxLxD, layer_stats = self._hidden(tokens_BxL, (*rows, capacity_factor, train, rng))
    depth_logits_DxBxLxV, depth_stats = self._predict_ahead(
        h_BxLxD, tokens_BxL, *rows, capacity_factor, train, rng)
    return self._logits(h_BxLxD), depth_logits_DxBxLxV, _append(layer_stats, depth_stats)

  def _predict_ahead(self, h_BxLxD, tokens_BxL, positions_BxL, segments_BxL, mask_BxL,
                     capacity_factor, train, rng):
    """The multi-token-prediction depths from the last block's output h: (their logits
    [D, B, L, V], the stats of their MoE blocks stacked, or None)."""
    depth_logits, depth_stats = [], []
    for k, module in enumerate(self.mtp, start=1):
      embedded_BxLxD = self._embed(shift_left(tokens_BxL, k, 0))
      h_BxLxD, stats = self._block(
          module.block, self.num_layers + k - 1, module.combine(h_BxLxD, embedded_BxLxD),
          positions_BxL, segments_BxL, shift_left(mask_BxL, k, False), capacity_factor,
          train, rng)
      depth_logits.append(self._logits(h_BxLxD, module.norm))
      if stats is not None:
        depth_stats.append(stats)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *depth_stats) if depth_stats else None
    return jnp.stack(depth_logits), stacked

  def _hidden(self, tokens_BxL, args):
    """The last block's output (before the final norm) and the MoE layers' stats, stacked."""
    x_BxLxD = self._embed(tokens_BxL)
    if self.scan_layers:
      return self._scanned(x_BxLxD, *args)
    layer_stats = []
    for index, block in enumerate(self.blocks):
      x_BxLxD, stats = self._block(block, index, x_BxLxD, *args)
      if stats is not None:
        layer_stats.append(stats)
    return x_BxLxD, self._stack(layer_stats)

  def _embed(self, tokens_BxL):
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.dtype)
    return sharding.constrain(x_BxLxD, self.mesh, 'batch', None, None)

  def _logits(self, x_BxLxD, norm=None):
    """The shared output head after `norm` (the final norm by default): float32 [B, L, V]."""
    x_BxLxD = (self.final_norm if norm is None else norm)(x_BxLxD)
    unembed = self.embed[...].T if self.unembed is None else self.unembed[...]
    logits_BxLxV = jnp.einsum('bld,dv->blv', x_BxLxD, unembed.astype(self.dtype))
    return logits_BxLxV.astype(jnp.float32)

  def _pipelined(self, tokens_MxBxL, rows, capacity_factor, train, rng, predict=False):
    """`forward` of microbatches with the main stack run by `stages.run`; the embedding, the
    dense stack before it and the blocks and head after it split them over the stages. With
    `predict`, `forward_mtp`'s: the prediction modules run after the head, microbatch by
    microbatch, their depth logits [D, M, B, L, V]."""
    dense, _, length, _ = self.plan
    mesh, main = self.mesh, getattr(self, self.main)
    before = self.dense_stack if self.main == 'moe_stack' else None

    def embed_and_dense(tokens_BxL, positions_BxL, segments_BxL, mask_BxL):
      x_BxLxD = self._embed(tokens_BxL)
      if before is not None:
        x_BxLxD = self._run_stack(before, 0, x_BxLxD, (positions_BxL, segments_BxL, mask_BxL,
                                                       capacity_factor, train, None))[0]
      return x_BxLxD
    x_MxBxLxD = stages.over_stages(embed_and_dense, mesh, tokens_MxBxL, *rows)
    microbatches = tokens_MxBxL.shape[0]
    keys_M = (None if rng is None else
              jax.vmap(lambda m: jax.random.fold_in(rng, m))(jnp.arange(microbatches)))
    # Every stage holds every microbatch: stage 0 feeds them in, the others pass them on.
    x_MxBxLxD = sharding.constrain(x_MxBxLxD, mesh, None, 'batch', None, None)
    graphdef, state = nnx.split(main)
    units_per_chunk = self.plan[1 if self.main == 'moe_stack' else 0] // (
        self.stages * self.repeats)
    start, step = (dense, length) if self.main == 'moe_stack' else (0, 1)

    def stage_fn(chunk_state, x_BxLxD, side, chunk):
      *row_inputs, key = side
      firsts = start + step * (chunk * units_per_chunk + jnp.arange(units_per_chunk))
      x_BxLxD, stats, _ = self._scan_units(graphdef, chunk_state, firsts, x_BxLxD,
                                           (*row_inputs, capacity_factor, train, key))
      return x_BxLxD, stats
    outputs_MxBxLxD, stats = stages.run(
        stage_fn, nnx.to_pure_dict(state), x_MxBxLxD,
        rows + (keys_M,), mesh=mesh, repeats=self.repeats)

    def tail_and_head(x_BxLxD, tokens_BxL, positions_BxL, segments_BxL, mask_BxL):
      first = self.plan[0] + self.plan[1] * length
      for offset, block in enumerate(self.tail):
        x_BxLxD, _ = self._block(block, first + offset, x_BxLxD, positions_BxL, segments_BxL,
                                 mask_BxL, capacity_factor, train, None)
      if not predict:
        return self._logits(x_BxLxD), None, None
      return self._logits(x_BxLxD), *self._predict_ahead(
          x_BxLxD, tokens_BxL, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
          None)
    logits_MxBxLxV, depth_logits_MxDxBxLxV, depth_stats_M = stages.over_stages(
        tail_and_head, mesh, outputs_MxBxLxD, tokens_MxBxL, *rows)
    layer_stats = (self._stack([]) if stats is None
                   else routing_stats.from_microbatch_sums(stats, microbatches))
    if not predict:
      return logits_MxBxLxV, layer_stats
    depth_stats = (None if depth_stats_M is None
                   else routing_stats.reduce_microbatches(depth_stats_M))
    return (logits_MxBxLxV, jnp.moveaxis(depth_logits_MxDxBxLxV, 1, 0),
            _append(layer_stats, depth_stats))

  def _block(self, block, index, x_BxLxD, positions_BxL, segments_BxL, mask_BxL,
             capacity_factor, train, rng):
    """One block; layer `index` draws its jitter from `fold_in(rng, index)`."""
    layer_rng = None if rng is None else jax.random.fold_in(rng, index)
    if self.remat == 'none':
      return block(x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
                   layer_rng)
    graphdef, state = nnx.split(block)

    def apply(state, x_BxLxD, layer_rng):
      block = nnx.merge(graphdef, state)
      out = block(x_BxLxD, positions_BxL, segments_BxL, mask_BxL, capacity_factor, train,
                  layer_rng)
      return out, nnx.to_pure_dict(nnx.state(block))
    out, new_state = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])(
        nnx.to_pure_dict(state), x_BxLxD, layer_rng)
    nnx.replace_by_pure_dict(state, new_state)
    nnx.update(block, state)
    return out

  def _scanned(self, x_BxLxD, *args):
    """Runs the dense stack, the MoE units and the trailing blocks; stats of MoE layers only."""
    dense, units, length, _ = self.plan
    moe_stats = []
    for stack, start in ((self.dense_stack, 0), (self.moe_stack, dense)):
      if stack is None:
        continue
      x_BxLxD, stats, new_state = self._run_stack(stack, start, x_BxLxD, args)
      state = nnx.state(stack)
      nnx.replace_by_pure_dict(state, new_state)
      nnx.update(stack, state)
      if stats is not None:
        moe_stats.append(stats)
    start = dense + units * length
    for offset, block in enumerate(self.tail):
      x_BxLxD, stats = self._block(block, start + offset, x_BxLxD, *args)
      if stats is not None:  # trailing blocks are dense
        moe_stats.append(jax.tree.map(lambda x: x[None], stats))
    if not moe_stats:
      return x_BxLxD, self._stack([])
    return x_BxLxD, jax.tree.map(lambda *xs: jnp.concatenate(xs), *moe_stats)

  def _run_stack(self, stack, start: int, x_BxLxD, args):
    """A scanned stack whose first block is layer `start`, one unit after another → (x, the
    stats of its MoE layers or None, its state as a pure dict, updated by the blocks)."""
    graphdef, state = nnx.split(stack)
    state = nnx.to_pure_dict(state)
    rounds = self.repeats if stack is getattr(self, self.main) else 1
    # A circular pipeline's [rounds, units / rounds] is the stack in order, row by row.
    units = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]) if rounds > 1 else a, state)
    count = jax.tree.leaves(units)[0].shape[0]
    firsts = start + len(stack.blocks) * jnp.arange(count)
    x_BxLxD, stats, new_units = self._scan_units(graphdef, units, firsts, x_BxLxD, args)
    return x_BxLxD, stats, jax.tree.map(lambda a, old: a.reshape(old.shape), new_units, state)

  def _scan_units(self, graphdef, units, firsts, x_BxLxD, args):
    """`lax.scan` of units (pure-dict state with a leading unit axis; unit i's first block is
    layer `firsts[i]`) → (x, stacked stats or None, the units' updated state)."""
    # Pure dicts of arrays cross the scan: Variables made outside it cannot be mutated inside.
    def body(x_BxLxD, xs):
      state, first = xs
      unit = nnx.merge(graphdef, state)
      stats = None
      for offset, block in enumerate(unit.blocks):
        x_BxLxD, block_stats = self._block(block, first + offset, x_BxLxD, *args)
        stats = block_stats if block_stats is not None else stats
      return x_BxLxD, (stats, nnx.to_pure_dict(nnx.state(unit)))
    x_BxLxD, (stats, new_units) = jax.lax.scan(body, x_BxLxD, (units, firsts),
                                               unroll=self.scan_unroll)
    return x_BxLxD, stats, new_units

  def _stack(self, layer_stats):
    if layer_stats:
      return jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats)
    return routing_stats.empty(self.num_experts)
