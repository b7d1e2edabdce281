"""Routing statistics of MoE layers as one typed pytree, each field with its declared reduction.

A layer reports counts and sums, not ratios: counts add up over microbatches (and pipeline
stages, and devices) to the counts of the whole step, and the ratios a person reads
(`expert_fraction`, `max_load`, `dropped_fraction`, …) are taken from those totals last, in
`layer_metrics`. So a metric means the same with any microbatching: the mean of per-microbatch
ratios would not (MOE_SPEC.md). The balance loss is the one field averaged over microbatches,
as the spec fixes it.

Shape suffixes: E experts; N MoE layers when stacked; K microbatches when stacked.
"""

import dataclasses

import jax
import jax.numpy as jnp

from moetrain.models import routing

# How a field combines over microbatches: 'sum' (counts), 'mean', or 'first' (the value the
# step started with).
REDUCTIONS = ('sum', 'mean', 'first')


def _field(reduce: str):
  return dataclasses.field(metadata={'reduce': reduce})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """One MoE layer's routing over a batch; arrays gain leading axes when stacked."""
  assignments_E: jax.Array = _field('sum')  # real tokens' choices of each real expert
  gate_mass_E: jax.Array = _field('sum')  # gate weights each real expert got from real tokens
  dropped: jax.Array = _field('sum')  # choices that got no expert output (over capacity)
  droppable: jax.Array = _field('sum')  # choices that could be dropped (denominator)
  real_experts: jax.Array = _field('sum')  # real experts computed for real tokens
  tokens: jax.Array = _field('sum')  # real tokens routed
  entropy_sum: jax.Array = _field('sum')  # router entropy summed over real tokens
  z_sum: jax.Array = _field('sum')  # (logsumexp of the router logits)² summed over real tokens
  aux_loss: jax.Array = _field('mean')  # load-balancing loss (MOE_SPEC.md)
  router_bias_E: jax.Array = _field('first')  # the balancing bias that routed the batch


def reduce_microbatches(stats_K: RoutingStats) -> RoutingStats:
  """Per-microbatch stats stacked on a leading axis → the step's, by each field's reduction."""
  reducers = {'sum': lambda a: jnp.sum(a, axis=0), 'mean': lambda a: jnp.mean(a, axis=0),
              'first': lambda a: a[0]}
  return RoutingStats(**{f.name: reducers[f.metadata['reduce']](getattr(stats_K, f.name))
                         for f in dataclasses.fields(RoutingStats)})


def merge_chunks(stats_C: list, units_C: list) -> RoutingStats:
  """One layer's stats from those of disjoint chunks of its groups: counts added, the balance
  loss averaged over all chunks' units (`routing.balance_units` of each chunk), as one pass over
  every group would give it."""
  def merged(field):
    values = [getattr(stats, field.name) for stats in stats_C]
    if field.metadata['reduce'] == 'sum':
      return sum(values)
    if field.metadata['reduce'] == 'first':
      return values[0]
    return sum(v * u for v, u in zip(values, units_C)) / jnp.maximum(sum(units_C), 1.0)
  return RoutingStats(**{f.name: merged(f) for f in dataclasses.fields(RoutingStats)})


def from_microbatch_sums(stats_sum: RoutingStats, microbatches: int) -> RoutingStats:
  """Stats summed over `microbatches` microbatches → the step's, by each field's reduction
  ('first' fields hold the same value in every microbatch of a step, so their mean)."""
  return RoutingStats(**{
      f.name: getattr(stats_sum, f.name) / (1 if f.metadata['reduce'] == 'sum' else microbatches)
      for f in dataclasses.fields(RoutingStats)})


def empty(num_experts: int) -> RoutingStats:
  """The stats of zero MoE layers, stacked: every field with a leading axis of size 0."""
  per_layer = lambda name: (0, num_experts) if name.endswith('_E') else (0,)
  return RoutingStats(**{f.name: jnp.zeros(per_layer(f.name), jnp.float32)
                         for f in dataclasses.fields(RoutingStats)})


def _per_token(total, tokens):
  return total / jnp.maximum(tokens, 1.0)


def z_loss(stats: RoutingStats) -> jax.Array:
  """ST-MoE z-loss per layer: mean over real tokens of logsumexp(z)²."""
  return _per_token(stats.z_sum, stats.tokens)


def layer_metrics(stats: RoutingStats) -> dict[str, jax.Array]:
  """The per-layer metrics of `metrics.jsonl` (arrays [N] or [N, E] for stacked stats)."""
  load_E = stats.assignments_E
  return {
      'expert_fraction': load_E / jnp.maximum(jnp.sum(load_E, axis=-1, keepdims=True), 1.0),
      'max_load': routing.max_over_mean(load_E),
      'dropped_fraction': stats.dropped / jnp.maximum(stats.droppable, 1.0),
      'experts_per_token': _per_token(stats.real_experts, stats.tokens),
      'router_entropy': _per_token(stats.entropy_sum, stats.tokens),
      'router_bias': stats.router_bias_E,
      'aux_loss_per_layer': stats.aux_loss,
      'z_loss_per_layer': z_loss(stats),
  }


def token_choice(*, probs_GxTxR, logits_GxTxR, experts_GxTxK, gates_GxTxK, kept_GxTxK,
                 mask_GxT, num_experts: int, aux_loss, bias_E) -> RoutingStats:
  """Stats of top-k routing: choices before dropping, and those the capacity dropped.
  `num_experts` counts the router's real outputs (merged experts: R)."""
  mask_GxT = mask_GxT.astype(jnp.float32)
  dropped, real = drop_counts(experts_GxTxK, kept_GxTxK, mask_GxT, num_experts)
  onehot_GxTxKxE = jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.float32)
  return RoutingStats(
      assignments_E=routing.expert_load(experts_GxTxK, mask_GxT, num_experts),
      gate_mass_E=jnp.einsum('gtke,gtk,gt->e', onehot_GxTxKxE,
                             gates_GxTxK.astype(jnp.float32), mask_GxT),
      dropped=dropped, droppable=real, real_experts=real,
      **_router_sums(probs_GxTxR, logits_GxTxR, mask_GxT),
      aux_loss=aux_loss, router_bias_E=_bias(bias_E, num_experts))


def drop_counts(experts_GxTxK: jax.Array, kept_GxTxK: jax.Array, mask_GxT: jax.Array,
                num_experts: int) -> tuple[jax.Array, jax.Array]:
  """(dropped, all) assignments of real tokens to real (not null) experts: -> two [] f32."""
  real_GxTxK = (mask_GxT > 0)[..., None] & (experts_GxTxK < num_experts)
  return (jnp.sum(real_GxTxK & ~kept_GxTxK).astype(jnp.float32),
          jnp.sum(real_GxTxK).astype(jnp.float32))


def expert_choice(*, probs_GxTxR, logits_GxTxR, tokens_GxExC, gates_GxExC,
                  mask_GxT) -> RoutingStats:
  """Stats of expert choice: every expert fills its capacity, so there is no imbalance to
  penalise; a token is 'dropped' when no expert chose it."""
  groups, tokens = mask_GxT.shape
  num_experts = tokens_GxExC.shape[1]
  mask_GxT = mask_GxT.astype(jnp.float32)
  chosen_GxExC = (gates_GxExC > 0).astype(jnp.float32)
  # Sentinel slots point at token index T, one past the end, and are sliced off.
  picks_GxT = jnp.zeros((groups, tokens + 1)).at[
      jnp.arange(groups)[:, None], tokens_GxExC.reshape(groups, -1)].add(
          chosen_GxExC.reshape(groups, -1))[:, :tokens]
  return RoutingStats(
      assignments_E=jnp.sum(chosen_GxExC, axis=(0, 2)),
      gate_mass_E=jnp.sum(gates_GxExC.astype(jnp.float32), axis=(0, 2)),
      dropped=jnp.sum((picks_GxT == 0) * mask_GxT), droppable=jnp.sum(mask_GxT),
      real_experts=jnp.sum(picks_GxT * mask_GxT),
      **_router_sums(probs_GxTxR, logits_GxTxR, mask_GxT),
      aux_loss=jnp.zeros((), jnp.float32), router_bias_E=_bias(None, num_experts))


def _router_sums(probs_GxTxR, logits_GxTxR, mask_GxT) -> dict:
  tokens = jnp.sum(mask_GxT)
  return {'tokens': tokens,
          'entropy_sum': routing.router_entropy(probs_GxTxR, mask_GxT) * tokens,
          'z_sum': routing.router_z_loss(logits_GxTxR, mask_GxT) * tokens}


def _bias(bias_E, num_experts):
  return jnp.zeros((num_experts,), jnp.float32) if bias_E is None else bias_E
