"""Router math for sparse MoE layers: scores, expert selection, gates, auxiliary losses, capacity.

Shape suffixes: G dispatch groups, T tokens per group, E experts, K experts per token,
C capacity. `mask_GxT` is 1.0 for real tokens and 0.0 for padding; padding never counts in any
statistic. With m null experts (AdaMoE) the router has E + m outputs, the last m of them null:
a chosen index >= E costs no compute and adds no output.
"""

import math

import jax
import jax.numpy as jnp

AUX_LOSS_MODES = ('local', 'global', 'sequence', 'none')
_TINY = float(jnp.finfo(jnp.float32).tiny)


def router_probabilities(logits_GxTxE: jax.Array) -> jax.Array:
  """Softmax over experts in float32: [G, T, E] -> [G, T, E]."""
  return jax.nn.softmax(logits_GxTxE.astype(jnp.float32), axis=-1)


def sigmoid_scores(logits_GxTxE: jax.Array) -> jax.Array:
  """DeepSeek-V3 per-expert affinities sigmoid(z) in float32: [G, T, E] -> [G, T, E]."""
  return jax.nn.sigmoid(logits_GxTxE.astype(jnp.float32))


def normalized_scores(scores_GxTxE: jax.Array) -> jax.Array:
  """s / sum_j s_j, the 'probabilities' of a sigmoid router for the balance loss: -> [G, T, E]."""
  scores_GxTxE = scores_GxTxE.astype(jnp.float32)
  return scores_GxTxE / jnp.maximum(jnp.sum(scores_GxTxE, axis=-1, keepdims=True), _TINY)


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Switch input jitter x * U(1 - eps, 1 + eps), training only: [...] -> [...] in x's dtype."""
  # Drawn in float32: in bfloat16 the noise around 1.0 would round to a handful of values.
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def select_experts(scores_GxTxE: jax.Array, k: int, *, bias_E: jax.Array | None = None,
                   num_groups: int = 1, topk_groups: int = 1) -> jax.Array:
  """Top-k of scores + bias, best first, optionally group-limited: -> experts [G, T, K] i32."""
  num_experts = scores_GxTxE.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'top_k={k} must be in [1, num_experts={num_experts}]')
  select_GxTxE = scores_GxTxE.astype(jnp.float32)
  if bias_E is not None:
    # The bias only steers the choice; no gradient may reach it through any path.
    select_GxTxE = select_GxTxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  if num_groups > 1:
    if num_experts % num_groups or not 1 <= topk_groups <= num_groups:
      raise ValueError(f'num_experts={num_experts} must split into num_groups={num_groups} '
                       f'equal groups and topk_groups={topk_groups} must be in [1, num_groups]')
    group_size = num_experts // num_groups
    if k > topk_groups * group_size:
      raise ValueError(f'top_k={k} exceeds the {topk_groups * group_size} experts of the kept '
                       'groups')
    grouped_GxTxNxS = select_GxTxE.reshape(*select_GxTxE.shape[:-1], num_groups, group_size)
    # DeepSeek-V3 scores a group by the sum of its top-2 (V2 used the max), bias included.
    best_GxTxNx2, _ = jax.lax.top_k(grouped_GxTxNxS, min(2, group_size))
    _, groups_GxTxM = jax.lax.top_k(jnp.sum(best_GxTxNx2, axis=-1), topk_groups)
    keep_GxTxN = jnp.sum(jax.nn.one_hot(groups_GxTxM, num_groups, dtype=jnp.int32), axis=-2) > 0
    keep_GxTxE = jnp.repeat(keep_GxTxN, group_size, axis=-1)
    select_GxTxE = jnp.where(keep_GxTxE, select_GxTxE, -jnp.inf)
  # lax.top_k breaks ties by the lowest index, which is the tie rule the spec fixes.
  _, experts_GxTxK = jax.lax.top_k(select_GxTxE, k)
  return experts_GxTxK.astype(jnp.int32)


def top_p(probs_GxTxE: jax.Array, threshold: float, k: int, *,
          normalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Dynamic routing (Huang et al. 2024): each token takes experts in descending probability
  until their cumulative probability reaches `threshold`, at most `k` of them (static shapes):
  -> (experts [G, T, K] i32, best first, a slot past the threshold holding E, a null expert;
  gates [G, T, K] f32: the chosen probabilities, 0 on null slots, renormalised over the chosen
  ones when `normalize`). The first expert is always taken; lax.top_k breaks ties by index.
  """
  num_experts = probs_GxTxE.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'top_k={k} must be in [1, num_experts={num_experts}]')
  best_GxTxK, experts_GxTxK = jax.lax.top_k(probs_GxTxE.astype(jnp.float32), k)
  before_GxTxK = jnp.cumsum(best_GxTxK, axis=-1) - best_GxTxK
  taken_GxTxK = before_GxTxK < threshold
  gates_GxTxK = jnp.where(taken_GxTxK, best_GxTxK, 0.0)
  if normalize:
    gates_GxTxK = gates_GxTxK / jnp.sum(gates_GxTxK, axis=-1, keepdims=True)
  return jnp.where(taken_GxTxK, experts_GxTxK, num_experts).astype(jnp.int32), gates_GxTxK


def gate_weights(scores_GxTxE: jax.Array, experts_GxTxK: jax.Array, *, normalize: bool,
                 scaling: float = 1.0, num_null_experts: int = 0) -> jax.Array:
  """Raw scores of the chosen experts, renormalised if asked, times scaling: -> [G, T, K] f32.

  With null experts, renormalisation runs over the chosen real experts only and null slots get
  weight 0 (AdaMoE's reference code), so a token's real experts keep full weight.
  """
  weights_GxTxK = jnp.take_along_axis(scores_GxTxE.astype(jnp.float32), experts_GxTxK, axis=-1)
  if num_null_experts:
    real_GxTxK = experts_GxTxK < scores_GxTxE.shape[-1] - num_null_experts
    weights_GxTxK = jnp.where(real_GxTxK, weights_GxTxK, 0.0)
  if normalize:
    # A token that chose only null experts has a zero sum; its weights stay 0, not NaN.
    total_GxTx1 = jnp.sum(weights_GxTxK, axis=-1, keepdims=True)
    weights_GxTxK = weights_GxTxK / jnp.maximum(total_GxTx1, _TINY)
  return weights_GxTxK * scaling


def top_k_gates(probs_GxTxE: jax.Array, k: int,
                norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Softmax top-k, best first: -> (weights [G, T, K] f32, experts [G, T, K] i32)."""
  experts_GxTxK = select_experts(probs_GxTxE, k)
  return gate_weights(probs_GxTxE, experts_GxTxK, normalize=norm_topk_prob), experts_GxTxK


def skip_small_gates(experts_GxTxK: jax.Array, gates_GxTxK: jax.Array, ratio: float, *,
                     skipped: int) -> tuple[jax.Array, jax.Array]:
  """Dynamic skipping (Lu et al. 2024): a token's later choices whose gate is below `ratio` ×
  its first choice's are not computed: -> (experts [G, T, K], index `skipped` (a null expert)
  there; gates [G, T, K], 0 there; the others not renormalised)."""
  later_K = jnp.arange(experts_GxTxK.shape[-1]) > 0
  skip_GxTxK = later_K & (gates_GxTxK < ratio * gates_GxTxK[..., :1])
  return (jnp.where(skip_GxTxK, skipped, experts_GxTxK).astype(jnp.int32),
          jnp.where(skip_GxTxK, 0.0, gates_GxTxK))


def to_physical(experts_GxTxK: jax.Array, map_R: jax.Array, num_experts: int) -> jax.Array:
  """Router outputs → the experts that compute them (merged experts, `map_R`); an index >= R
  (a skipped choice) becomes E, which no expert computes: [G, T, K] → [G, T, K] i32."""
  outputs = map_R.shape[0]
  mapped_GxTxK = jnp.take(map_R, jnp.minimum(experts_GxTxK, outputs - 1))
  return jnp.where(experts_GxTxK < outputs, mapped_GxTxK, num_experts).astype(jnp.int32)


def real_expert_count(experts_GxTxK: jax.Array, num_experts: int) -> jax.Array:
  """Chosen experts per token that are real (index < E), not null: -> [G, T] i32."""
  return jnp.sum(experts_GxTxK < num_experts, axis=-1, dtype=jnp.int32)


def mean_real_experts(experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                      num_experts: int) -> jax.Array:
  """Mean over real tokens of the number of real experts chosen: -> [] f32."""
  mask_GxT = mask_GxT.astype(jnp.float32)
  count_GxT = real_expert_count(experts_GxTxK, num_experts).astype(jnp.float32)
  return jnp.sum(count_GxT * mask_GxT) / jnp.maximum(jnp.sum(mask_GxT), 1.0)


def expert_choice(probs_GxTxE: jax.Array, capacity: int,
                  mask_GxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each expert takes its top-C real tokens by p: -> (tokens [G, E, C] i32, weights [G, E, C] f32).

  A slot left empty because the group has fewer than C real tokens holds the sentinel T (out of
  range, like dispatch's empty slots) and weight 0. Ties go to the lower token index.
  """
  tokens = probs_GxTxE.shape[1]
  if not 1 <= capacity <= tokens:
    raise ValueError(f'capacity={capacity} must be in [1, tokens per group={tokens}]')
  real_GxTx1 = (mask_GxT > 0)[..., None]
  candidates_GxExT = jnp.where(real_GxTx1, probs_GxTxE.astype(jnp.float32), -jnp.inf)
  values_GxExC, tokens_GxExC = jax.lax.top_k(candidates_GxExT.transpose(0, 2, 1), capacity)
  filled_GxExC = values_GxExC > -jnp.inf
  tokens_GxExC = jnp.where(filled_GxExC, tokens_GxExC, tokens).astype(jnp.int32)
  return tokens_GxExC, jnp.where(filled_GxExC, values_GxExC, 0.0)


def expert_capacity(tokens_per_group: int, top_k: int, num_experts: int,
                    capacity_factor: float, min_capacity: int, *, copies: int = 1) -> int:
  """Slots per expert per group: ceil(cf * T * k / E), >= min_capacity, <= copies * T (the
  most assignments one expert can get: `copies` > 1 when merged experts share it); cf <= 0: T
  * copies."""
  most = tokens_per_group * copies
  if capacity_factor <= 0:
    return most
  # Rounding first keeps e.g. 1.1 * 20 / 2 = 11.000000000000002 from becoming 12.
  capacity = math.ceil(round(capacity_factor * tokens_per_group * top_k / num_experts, 6))
  # A token picks a router output at most once, so an expert never holds more than T tokens of a
  # group per router output it computes.
  return min(max(capacity, min_capacity), most)


def _assignment_counts(experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                       num_experts: int) -> jax.Array:
  """Real assignments per token and expert: [G, T, K] -> [G, T, E] f32 of 0s and 1s.

  Indices >= num_experts (null experts when num_experts = E) one-hot to zeros and never count.
  """
  onehot_GxTxE = jnp.sum(jax.nn.one_hot(experts_GxTxK, num_experts, dtype=jnp.float32), axis=-2)
  return onehot_GxTxE * mask_GxT.astype(jnp.float32)[..., None]


def _balance_loss_per_unit(probs_UxSxE, experts_UxSxK, mask_UxS, num_null_experts):
  """E' * sum_i f_i * P_i within each unit of S tokens: -> (loss [U], has real tokens [U])."""
  num_experts, k = probs_UxSxE.shape[-1], experts_UxSxK.shape[-1]
  mask_UxS = mask_UxS.astype(jnp.float32)
  real_U = jnp.sum(mask_UxS, axis=-1)
  denom_Ux1 = jnp.maximum(real_U, 1.0)[:, None]
  counts_UxE = jnp.sum(_assignment_counts(experts_UxSxK, mask_UxS, num_experts), axis=1)
  f_UxE = counts_UxE / (k * denom_Ux1)
  p_UxE = jnp.sum(probs_UxSxE.astype(jnp.float32) * mask_UxS[..., None], axis=1) / denom_Ux1
  if num_null_experts:
    # AdaMoE: null experts are interchangeable, so only their mean usage is balanced; each null
    # expert's f becomes the null mean, which makes the null terms m * mean(f) * mean(P).
    num_real = num_experts - num_null_experts
    f_null_Ux1 = jnp.mean(f_UxE[:, num_real:], axis=-1, keepdims=True)
    f_UxE = jnp.concatenate(
        [f_UxE[:, :num_real], jnp.broadcast_to(f_null_Ux1, (f_UxE.shape[0], num_null_experts))],
        axis=-1)
  return num_experts * jnp.sum(f_UxE * p_UxE, axis=-1), real_U > 0


def load_balance_loss(probs_GxTxE: jax.Array, experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                      *, mode: str = 'local', num_null_experts: int = 0,
                      seq_len: int | None = None) -> jax.Array:
  """Switch loss E' * sum_i f_i * P_i over groups, the batch or sequences: -> [] f32.

  E' counts null experts too. 'local' averages per-group losses, 'global' pools all real tokens,
  'sequence' averages per-sequence losses (groups of T = group_size * seq_len tokens; seq_len None
  means T); averages skip units without real tokens. 'none' gives 0.
  """
  if mode not in AUX_LOSS_MODES:
    raise ValueError(f'unknown aux loss mode {mode!r}; expected one of {AUX_LOSS_MODES}')
  if mode == 'none':
    return jnp.zeros((), jnp.float32)
  num_groups, tokens, num_experts = probs_GxTxE.shape
  if not 0 <= num_null_experts < num_experts:
    raise ValueError(f'num_null_experts={num_null_experts} must be in [0, {num_experts})')
  unit = _balance_unit(mode, num_groups, tokens, seq_len)
  # Groups hold whole sequences in order, so a reshape regroups tokens into the chosen units.
  loss_U, has_real_U = _balance_loss_per_unit(
      probs_GxTxE.reshape(-1, unit, num_experts),
      experts_GxTxK.reshape(-1, unit, experts_GxTxK.shape[-1]), mask_GxT.reshape(-1, unit),
      num_null_experts)
  # Units of padding only have no routing to balance; counting them as 0 would bias the mean.
  has_real_U = has_real_U.astype(jnp.float32)
  return jnp.sum(loss_U * has_real_U) / jnp.maximum(jnp.sum(has_real_U), 1.0)


def _balance_unit(mode: str, num_groups: int, tokens: int, seq_len: int | None) -> int:
  """Tokens in one unit the balance loss of `mode` averages over."""
  if mode == 'local':
    return tokens
  if mode == 'global':
    return num_groups * tokens
  unit = tokens if seq_len is None else seq_len
  if tokens % unit:
    raise ValueError(f'seq_len={seq_len} must divide the {tokens} tokens of a group')
  return unit


def balance_units(mask_GxT: jax.Array, *, mode: str = 'local',
                  seq_len: int | None = None) -> jax.Array:
  """How many units `load_balance_loss` averages over, those with a real token: -> [] f32 (the
  weight of its value when the losses of disjoint sets of groups are combined; 0 for 'none')."""
  if mode == 'none':
    return jnp.zeros((), jnp.float32)
  num_groups, tokens = mask_GxT.shape
  real_U = jnp.any(mask_GxT.reshape(-1, _balance_unit(mode, num_groups, tokens, seq_len)) != 0,
                   axis=-1)
  return jnp.sum(real_U.astype(jnp.float32))


def router_z_loss(logits_GxTxE: jax.Array, mask_GxT: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(z)^2: -> [] f32."""
  mask_GxT = mask_GxT.astype(jnp.float32)
  lse_GxT = jax.nn.logsumexp(logits_GxTxE.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse_GxT) * mask_GxT) / jnp.maximum(jnp.sum(mask_GxT), 1.0)


def router_entropy(probs_GxTxE: jax.Array, mask_GxT: jax.Array) -> jax.Array:
  """Mean over real tokens of -sum_i p_i log p_i (0 log 0 = 0): -> [] f32."""
  probs_GxTxE = probs_GxTxE.astype(jnp.float32)
  mask_GxT = mask_GxT.astype(jnp.float32)
  positive_GxTxE = probs_GxTxE > 0
  # The inner where keeps log(0) out of the graph, so the gradient stays finite at p = 0.
  safe_GxTxE = jnp.where(positive_GxTxE, probs_GxTxE, 1.0)
  plogp_GxTxE = jnp.where(positive_GxTxE, probs_GxTxE * jnp.log(safe_GxTxE), 0.0)
  entropy_GxT = -jnp.sum(plogp_GxTxE, axis=-1)
  return jnp.sum(entropy_GxT * mask_GxT) / jnp.maximum(jnp.sum(mask_GxT), 1.0)


def expert_fraction(experts_GxTxK: jax.Array, mask_GxT: jax.Array,
                    num_experts: int) -> jax.Array:
  """Share of all real assignments to real experts (before dropping): -> [E] f32 summing to 1."""
  counts_E = expert_load(experts_GxTxK, mask_GxT, num_experts)
  return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)


def expert_load(experts_GxTxK: jax.Array, mask_GxT: jax.Array, num_experts: int) -> jax.Array:
  """Real tokens' assignments per real expert over the whole batch, before dropping: -> [E] f32."""
  return jnp.sum(_assignment_counts(experts_GxTxK, mask_GxT, num_experts), axis=(0, 1))


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step b + rate * sign(mean(load) - load), no gradient: -> [E]."""
  load_E = jax.lax.stop_gradient(load_E.astype(jnp.float32))
  step_E = rate * jnp.sign(jnp.mean(load_E) - load_E)
  return jax.lax.stop_gradient(bias_E + step_E.astype(bias_E.dtype))


def max_over_mean(load_E: jax.Array) -> jax.Array:
  """Imbalance max_i load_i / mean_i load_i over the last axis (1.0 is balanced; 0.0 when
  there is no load): [..., E] -> [...]."""
  load_E = load_E.astype(jnp.float32)
  # Loads are >= 0, so the initial 0 changes nothing but lets a model without experts report.
  return jnp.max(load_E, axis=-1, initial=0.0) / jnp.maximum(jnp.mean(load_E, axis=-1), _TINY)
