"""Router math against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.models import routing

# E=2, T=4, k=1. Top-1 experts: 0, 0, 1, 0 -> f = [3/4, 1/4].
# P = column means = [(0.9 + 0.8 + 0.3 + 0.6) / 4, (0.1 + 0.2 + 0.7 + 0.4) / 4] = [0.65, 0.35].
# L = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15.
PROBS_E2 = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
EXPERTS_E2_K1 = [[0], [0], [1], [0]]
LOSS_E2_K1 = 1.15

# E=4, T=4, k=2. Top-2 experts: {0, 1}, {1, 2}, {2, 0} (0 wins the 0.25 tie with 1), {3, 2}.
# Counts [2, 2, 3, 1] of 8 -> f = [0.25, 0.25, 0.375, 0.125].
# P = column means = [0.85, 1.25, 1.2, 0.7] / 4 = [0.2125, 0.3125, 0.3, 0.175].
# sum f*P = 0.053125 + 0.078125 + 0.1125 + 0.021875 = 0.265625, L = 4 * 0.265625 = 1.0625.
PROBS_E4 = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.4, 0.1],
            [0.1, 0.2, 0.3, 0.4]]
EXPERTS_E4_K2 = [[0, 1], [1, 2], [2, 0], [3, 2]]
LOSS_E4_K2 = 1.0625


def f32(value):
  return jnp.asarray(value, jnp.float32)


def test_router_probabilities_are_float32_softmax():
  logits = jnp.asarray([[[0.0, math.log(3.0)], [1.0, 1.0]]], jnp.bfloat16)
  probs = routing.router_probabilities(logits)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs, [[[0.25, 0.75], [0.5, 0.5]]], rtol=1e-2)


@pytest.mark.parametrize('k', [1, 2])
def test_load_balance_loss_is_one_for_uniform_routing(k):
  G, T, E = 2, 8, 4
  probs = jnp.full((G, T, E), 1.0 / E)
  # Round-robin: every expert gets the same number of assignments.
  experts = (np.arange(T)[:, None] + np.arange(k)[None, :]) % E
  experts = jnp.asarray(np.broadcast_to(experts, (G, T, k)), jnp.int32)
  loss = routing.load_balance_loss(probs, experts, jnp.ones((G, T)))
  assert float(loss) == 1.0


@pytest.mark.parametrize(
    'probs, k, experts, loss',
    [(PROBS_E2, 1, EXPERTS_E2_K1, LOSS_E2_K1), (PROBS_E4, 2, EXPERTS_E4_K2, LOSS_E4_K2)],
    ids=['E2_k1', 'E4_k2'],
)
def test_load_balance_loss_hand_computed(probs, k, experts, loss):
  probs = f32([probs])
  _, chosen = routing.top_k_gates(probs, k, norm_topk_prob=False)
  np.testing.assert_array_equal(chosen[0], experts)  # includes the lowest-index tie break
  got = routing.load_balance_loss(probs, chosen, jnp.ones(probs.shape[:2]))
  np.testing.assert_allclose(got, loss, rtol=1e-6)


def test_load_balance_loss_masks_padding_and_averages_groups():
  # Group 0: the E=2 example plus 2 padding tokens that would all pick expert 1 -> 1.15.
  # Group 1: 2 real tokens, uniform probs, one per expert -> 1.0; then 4 padding tokens.
  # Local mean (1.15 + 1.0) / 2 = 1.075; pooling all 6 real tokens would give 1.0667 instead.
  probs = f32([PROBS_E2 + [[0.05, 0.95]] * 2, [[0.5, 0.5]] * 2 + [[0.01, 0.99]] * 4])
  experts = jnp.asarray([EXPERTS_E2_K1 + [[1]] * 2, [[0], [1]] + [[1]] * 4], jnp.int32)
  mask = f32([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, experts, mask), 1.075, rtol=1e-6)
  np.testing.assert_allclose(routing.expert_fraction(experts, mask, 2), [4 / 6, 2 / 6], rtol=1e-6)


def test_load_balance_loss_all_padding_group_is_ignored():
  probs = f32([PROBS_E2, [[0.3, 0.7]] * 4])
  experts = jnp.asarray([EXPERTS_E2_K1, [[1]] * 4], jnp.int32)
  mask = f32([[1, 1, 1, 1], [0, 0, 0, 0]])
  loss = routing.load_balance_loss(probs, experts, mask)
  np.testing.assert_allclose(loss, LOSS_E2_K1, rtol=1e-6)


def test_load_balance_loss_gradient_flows_through_mean_probs():
  # dL/dp_ti = E * f_i / T_real on real tokens = 2 * [0.75, 0.25] / 4, zero on padding.
  probs = f32([PROBS_E2 + [[0.5, 0.5]]])
  experts = jnp.asarray([EXPERTS_E2_K1 + [[1]]], jnp.int32)
  mask = f32([[1, 1, 1, 1, 0]])
  grad = jax.grad(routing.load_balance_loss)(probs, experts, mask)
  np.testing.assert_allclose(grad[0], [[0.375, 0.125]] * 4 + [[0.0, 0.0]], rtol=1e-6)


def test_router_z_loss_hand_computed_and_masks_padding():
  # logsumexp(zeros over 4) = ln 4 = 2 ln 2; logsumexp(ln [1, 2, 3, 2]) = ln 8 = 3 ln 2.
  # Mean over the 2 real tokens: (4 + 9) / 2 * (ln 2)^2; the padding token's logits don't count.
  logits = f32([[[0.0] * 4, np.log([1.0, 2.0, 3.0, 2.0]), [50.0, 0.0, 0.0, 0.0]]])
  loss = routing.router_z_loss(logits, f32([[1, 1, 0]]))
  np.testing.assert_allclose(loss, 6.5 * math.log(2.0) ** 2, rtol=1e-6)
  loss = routing.router_z_loss(jnp.zeros((2, 3, 8)), jnp.ones((2, 3)))
  np.testing.assert_allclose(loss, math.log(8.0) ** 2, rtol=1e-6)


def test_top_k_gates_renormalisation():
  probs = f32([PROBS_E4])
  raw, experts = routing.top_k_gates(probs, 2, norm_topk_prob=False)
  normed, experts_normed = routing.top_k_gates(probs, 2, norm_topk_prob=True)
  assert raw.dtype == jnp.float32 and experts.dtype == jnp.int32
  np.testing.assert_array_equal(experts, experts_normed)
  np.testing.assert_array_equal(raw, jnp.take_along_axis(probs, experts, axis=-1))
  np.testing.assert_allclose(raw[0], [[0.4, 0.3], [0.5, 0.3], [0.4, 0.25], [0.4, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(normed, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(normed, raw / jnp.sum(raw, axis=-1, keepdims=True), rtol=1e-6)
  with pytest.raises(ValueError):
    routing.top_k_gates(probs, 5, norm_topk_prob=True)


@pytest.mark.parametrize(
    'tokens, k, experts, factor, min_capacity, expected',
    [
        (8, 1, 4, 1.0, 0, 2),  # ceil(8 / 4)
        (10, 1, 4, 1.0, 0, 3),  # ceil(2.5)
        (8, 2, 4, 1.25, 0, 5),  # ceil(1.25 * 16 / 4)
        (20, 1, 2, 1.1, 0, 11),  # 1.1 * 20 / 2 is 11.000000000000002 in floats
        (8, 1, 8, 0.5, 4, 4),  # min_capacity wins over ceil(0.5)
        (8, 2, 2, 2.0, 0, 8),  # 16 capped at T
        (4, 1, 4, 1.0, 16, 4),  # min_capacity capped at T too
        (8, 2, 4, 0.0, 0, 8),  # dropless
        (8, 2, 4, -1.0, 0, 8),  # dropless
    ],
)
def test_expert_capacity(tokens, k, experts, factor, min_capacity, expected):
  capacity = routing.expert_capacity(tokens, k, experts, factor, min_capacity)
  assert type(capacity) is int and capacity == expected


def test_expert_fraction_counts_assignments_before_dropping():
  experts = jnp.asarray([EXPERTS_E4_K2, [[3, 2]] * 4], jnp.int32)
  mask = f32([[1, 1, 1, 1], [1, 0, 0, 0]])
  # Counts [2, 2, 3, 1] + [0, 0, 1, 1] over 10 real assignments.
  fraction = routing.expert_fraction(experts, mask, 4)
  np.testing.assert_allclose(fraction, [0.2, 0.2, 0.4, 0.2], rtol=1e-6)


# --- Sigmoid routers, biased and group-limited selection ----------------------------------------

LN3, LN9 = math.log(3.0), math.log(9.0)


def test_sigmoid_scores_are_float32():
  scores = routing.sigmoid_scores(jnp.asarray([[[0.0, LN3, -LN3]]], jnp.bfloat16))
  assert scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, [[[0.5, 0.75, 0.25]]], rtol=1e-2)
  np.testing.assert_allclose(routing.normalized_scores(f32([[[0.5, 0.25, 0.25]]]) * 2),
                             [[[0.5, 0.25, 0.25]]], rtol=1e-6)


def test_sigmoid_gate_weights_with_scaling_and_bias():
  # s = [0.75, 0.5, 0.25, 0.9]. Top-2 {3, 0}: 2.5 * [0.9, 0.75] / 1.65 = [15/11, 12.5/11].
  scores = routing.sigmoid_scores(f32([[[LN3, 0.0, -LN3, LN9]]]))
  experts = routing.select_experts(scores, 2)
  np.testing.assert_array_equal(experts, [[[3, 0]]])
  weights = routing.gate_weights(scores, experts, normalize=True, scaling=2.5)
  np.testing.assert_allclose(weights, [[[15 / 11, 12.5 / 11]]], rtol=1e-6)
  # A bias of 0.5 on expert 1 makes s + b = [0.75, 1.0, 0.25, 0.9]: the choice becomes {1, 3},
  # but the weights use the raw s: 2.5 * [0.5, 0.9] / 1.4 = [12.5/14, 22.5/14].
  experts = routing.select_experts(scores, 2, bias_E=f32([0.0, 0.5, 0.0, 0.0]))
  np.testing.assert_array_equal(experts, [[[1, 3]]])
  weights = routing.gate_weights(scores, experts, normalize=True, scaling=2.5)
  np.testing.assert_allclose(weights, [[[12.5 / 14, 22.5 / 14]]], rtol=1e-6)
  raw = routing.gate_weights(scores, experts, normalize=False, scaling=2.5)
  np.testing.assert_allclose(raw, [[[1.25, 2.25]]], rtol=1e-6)


def test_softmax_over_top_k_logits_equals_renormalised_softmax():
  # Mixtral takes softmax over the k largest logits; moetrain renormalises the top-k softmax.
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6)) * 2.0
  top_logits, top_experts = jax.lax.top_k(logits, 2)
  mixtral = jax.nn.softmax(top_logits, axis=-1)
  probs = routing.router_probabilities(logits)
  experts = routing.select_experts(probs, 2)
  np.testing.assert_array_equal(experts, top_experts)
  weights = routing.gate_weights(probs, experts, normalize=True)
  np.testing.assert_allclose(weights, mixtral, rtol=1e-5)
  wrapped, wrapped_experts = routing.top_k_gates(probs, 2, norm_topk_prob=True)
  np.testing.assert_array_equal(wrapped_experts, experts)
  np.testing.assert_array_equal(wrapped, weights)


# E=8 in 4 groups of 2. Group scores (sum of top 2): [0.95, 1.1, 1.07, 0.3] -> keep groups 1, 2.
# The best single expert (0, 0.95) lies in a losing group; top-2 of experts 2..5 is {2, 4}.
# Max-based group scores (DeepSeek-V2) would keep groups 0 and 1 and pick {0, 2} instead.
GROUPED_SCORES = [0.95, 0.0, 0.6, 0.5, 0.55, 0.52, 0.1, 0.2]


def test_group_limited_selection_hand_computed():
  scores = f32([[GROUPED_SCORES]])
  np.testing.assert_array_equal(routing.select_experts(scores, 2), [[[0, 2]]])
  grouped = routing.select_experts(scores, 2, num_groups=4, topk_groups=2)
  np.testing.assert_array_equal(grouped, [[[2, 4]]])
  # The bias counts in the group score: +0.3 on expert 1 lifts group 0 to 1.25 > 1.07.
  bias = f32([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  biased = routing.select_experts(scores, 2, bias_E=bias, num_groups=4, topk_groups=2)
  np.testing.assert_array_equal(biased, [[[0, 2]]])
  with pytest.raises(ValueError):
    routing.select_experts(scores, 5, num_groups=4, topk_groups=2)  # only 4 experts kept
  with pytest.raises(ValueError):
    routing.select_experts(scores, 2, num_groups=3, topk_groups=1)  # 8 experts, 3 groups


def test_group_limited_selection_stays_in_chosen_groups_random():
  num_groups, topk_groups, k = 4, 2, 3
  scores = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 8)))
  bias = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (8,))) * 0.2
  experts = np.asarray(routing.select_experts(f32(scores), k, bias_E=f32(bias),
                                              num_groups=num_groups, topk_groups=topk_groups))
  select = (scores + bias).reshape(2, 16, num_groups, 2)
  group_score = np.sort(select, axis=-1)[..., -2:].sum(-1)
  for g, t in np.ndindex(2, 16):
    kept = np.argsort(-group_score[g, t], kind='stable')[:topk_groups]
    allowed = [e for e in range(8) if e // 2 in kept]
    assert set(experts[g, t]) <= set(allowed)
    best = sorted(allowed, key=lambda e: -select.reshape(2, 16, 8)[g, t, e])[:k]
    np.testing.assert_array_equal(experts[g, t], best)


# --- Auxiliary-loss-free balancing --------------------------------------------------------------


def test_bias_update_balances_a_skewed_router():
  groups, tokens, dim, num_experts, k, rate = 2, 128, 8, 8, 2, 1e-3
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (groups, tokens, dim))
  w = jax.random.normal(kw, (dim, num_experts)) / math.sqrt(dim)
  logits = jnp.einsum('gtd,de->gte', x, w).at[..., 0].add(2.0)
  scores, mask = routing.sigmoid_scores(logits), jnp.ones((groups, tokens))

  experts = routing.select_experts(scores, k)
  assert float(jnp.mean(jnp.any(experts == 0, axis=-1))) > 0.75  # expert 0 serves most tokens
  assert float(routing.max_over_mean(routing.expert_load(experts, mask, num_experts))) > 3.0

  @jax.jit
  def balance(bias_E):
    def step(_, bias_E):
      load_E = routing.expert_load(routing.select_experts(scores, k, bias_E=bias_E), mask,
                                   num_experts)
      return routing.update_bias(bias_E, load_E, rate)
    return jax.lax.fori_loop(0, 500, step, bias_E)

  bias = balance(jnp.zeros(num_experts))
  load = routing.expert_load(routing.select_experts(scores, k, bias_E=bias), mask, num_experts)
  assert float(jnp.sum(load)) == groups * tokens * k
  assert float(routing.max_over_mean(load)) < 1.2
  assert float(bias[0]) < 0.0

  def loss(bias_E):
    chosen = routing.select_experts(scores, k, bias_E=bias_E)
    weights = routing.gate_weights(scores, chosen, normalize=True, scaling=2.5)
    return jnp.sum(weights * jnp.arange(1.0, k + 1.0)) + jnp.sum(chosen)
  assert not np.any(np.asarray(jax.grad(loss)(bias)))
  grad = jax.grad(lambda b: jnp.sum(routing.update_bias(b, load, rate) ** 2))(bias)
  assert not np.any(np.asarray(grad))


def test_update_bias_and_load_hand_computed():
  # Null index 4 (E=4) and the padding token never count.
  experts = jnp.asarray([[[0, 1], [0, 2], [0, 4], [3, 3]]], jnp.int32)
  load = routing.expert_load(experts, f32([[1, 1, 1, 0]]), 4)
  np.testing.assert_array_equal(load, [3.0, 1.0, 1.0, 0.0])
  # mean 1.25: expert 0 is over (down), the others under (up).
  bias = routing.update_bias(f32([0.1, 0.0, 0.0, 0.0]), load, 0.5)
  np.testing.assert_allclose(bias, [-0.4, 0.5, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(routing.update_bias(f32([0.1, 0.2]), f32([2, 2]), 0.5), [0.1, 0.2])
  np.testing.assert_allclose(routing.max_over_mean(load), 3.0 / 1.25, rtol=1e-6)
  assert float(routing.max_over_mean(jnp.zeros(4))) == 0.0


# --- Null experts (AdaMoE) ----------------------------------------------------------------------


def test_null_experts_counts_and_gate_weights():
  # E=2 real experts (0, 1) and m=2 null experts (2, 3), k=3.
  experts = jnp.asarray([[[0, 2, 1], [3, 0, 2], [2, 3, 3]]], jnp.int32)
  np.testing.assert_array_equal(routing.real_expert_count(experts, 2), [[2, 1, 0]])
  mean = routing.mean_real_experts(experts, f32([[1, 1, 0]]), 2)
  np.testing.assert_allclose(mean, 1.5, rtol=1e-6)
  # Renormalised over the real chosen experts only: 0.4, 0.3 -> 4/7, 3/7; all-null stays 0.
  scores = f32([[[0.4, 0.3, 0.2, 0.1]] * 3])
  weights = routing.gate_weights(scores, experts, normalize=True, num_null_experts=2)
  np.testing.assert_allclose(weights, [[[4 / 7, 0, 3 / 7], [0, 1, 0], [0, 0, 0]]], rtol=1e-6)
  fraction = routing.expert_fraction(experts, f32([[1, 1, 1]]), 2)
  np.testing.assert_allclose(fraction, [2 / 3, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize('mode', ['local', 'global', 'sequence'])
def test_null_aware_loss_is_one_for_uniform_routing(mode):
  G, T, E, m, k = 2, 6, 4, 2, 3
  probs = jnp.full((G, T, E + m), 1.0 / (E + m))
  experts = (np.arange(T)[:, None] + np.arange(k)[None, :]) % (E + m)
  experts = jnp.asarray(np.broadcast_to(experts, (G, T, k)), jnp.int32)
  loss = routing.load_balance_loss(probs, experts, jnp.ones((G, T)), mode=mode,
                                   num_null_experts=m, seq_len=6)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_null_aware_loss_hand_computed():
  # E=2 real + m=2 null, k=2, 2 tokens choosing {0, 2} and {3, 2}: f = [1/4, 0, 1/2, 1/4],
  # P = [0.25, 0.125, 0.275, 0.35]. Pooled nulls: mean f 0.375, sum P 0.625, so
  # L = 4 * (0.25 * 0.25 + 0 + 0.375 * 0.625) = 4 * 0.296875 = 1.1875 (unpooled would be 1.15).
  probs = f32([[[0.4, 0.1, 0.3, 0.2], [0.1, 0.15, 0.25, 0.5]]])
  experts = jnp.asarray([[[0, 2], [3, 2]]], jnp.int32)
  mask = jnp.ones((1, 2))
  got = routing.load_balance_loss(probs, experts, mask, num_null_experts=2)
  np.testing.assert_allclose(got, 1.1875, rtol=1e-6)
  np.testing.assert_allclose(routing.load_balance_loss(probs, experts, mask), 1.15, rtol=1e-6)
  # Gradient: null columns get E' * mean f_null / T = 4 * 0.375 / 2 each, real E' * f_i / T.
  grad = jax.grad(lambda p: routing.load_balance_loss(p, experts, mask, num_null_experts=2))(probs)
  np.testing.assert_allclose(grad[0], [[0.5, 0.0, 0.75, 0.75]] * 2, rtol=1e-6)


# --- Load-balance loss modes --------------------------------------------------------------------

# G=3, T=4, E=2, k=1. Group 0: the E=2 example (1.15). Group 1: 3 real tokens choosing 0, 1, 1
# with P = [1.1, 1.9] / 3 -> 2 * (1.1 + 3.8) / 9 = 9.8 / 9; its padding token would pick 1.
# Group 2 is padding only.
MODE_PROBS = [PROBS_E2, [[0.5, 0.5], [0.2, 0.8], [0.4, 0.6], [0.01, 0.99]], [[0.3, 0.7]] * 4]
MODE_EXPERTS = [EXPERTS_E2_K1, [[0], [1], [1], [1]], [[1]] * 4]
MODE_MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
MODE_LOSSES = {
    'local': (1.15 + 9.8 / 9) / 2,
    # 7 real tokens: counts [4, 3], probability sums [3.7, 3.3] -> 2 * (4 * 3.7 + 3 * 3.3) / 49.
    'global': 49.4 / 49,
    # Sequences of 2: f = [1, 0], P = [.85, .15] -> 1.7; [.5, .5] -> 1.0; [.5, .5] -> 1.0;
    # one real token choosing 1 with p = .6 -> 1.2; the padding-only sequences are skipped.
    'sequence': (1.7 + 1.0 + 1.0 + 1.2) / 4,
    'none': 0.0,
}


@pytest.mark.parametrize('mode', sorted(MODE_LOSSES))
def test_load_balance_loss_modes_hand_computed(mode):
  probs, experts = f32(MODE_PROBS), jnp.asarray(MODE_EXPERTS, jnp.int32)
  got = routing.load_balance_loss(probs, experts, f32(MODE_MASK), mode=mode, seq_len=2)
  np.testing.assert_allclose(got, MODE_LOSSES[mode], rtol=1e-6)


def test_load_balance_loss_mode_relations_and_errors():
  probs, experts, mask = f32(MODE_PROBS), jnp.asarray(MODE_EXPERTS, jnp.int32), f32(MODE_MASK)
  loss = lambda *args, **kw: float(routing.load_balance_loss(*args, **kw))
  assert loss(probs, experts, mask) == loss(probs, experts, mask, mode='local')
  assert loss(probs, experts, mask, mode='sequence') == loss(probs, experts, mask, mode='local')
  flat = (probs.reshape(1, -1, 2), experts.reshape(1, -1, 1), mask.reshape(1, -1))
  assert loss(probs, experts, mask, mode='global') == loss(*flat, mode='local')
  with pytest.raises(ValueError):
    routing.load_balance_loss(probs, experts, mask, mode='batch')
  with pytest.raises(ValueError):
    routing.load_balance_loss(probs, experts, mask, mode='sequence', seq_len=3)


@pytest.mark.parametrize('mode', ['local', 'global', 'sequence'])
@pytest.mark.parametrize('k', [1, 2])
def test_load_balance_loss_modes_uniform_is_one(mode, k):
  G, T, E = 2, 8, 4
  probs = jnp.full((G, T, E), 1.0 / E)
  experts = (np.arange(T)[:, None] + np.arange(k)[None, :]) % E
  experts = jnp.asarray(np.broadcast_to(experts, (G, T, k)), jnp.int32)
  loss = routing.load_balance_loss(probs, experts, jnp.ones((G, T)), mode=mode, seq_len=4)
  assert float(loss) == 1.0


# --- Expert choice ------------------------------------------------------------------------------


def test_expert_choice_hand_computed():
  probs = f32([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]],
               # Tokens 1 and 2 are padding with the highest probabilities: never chosen.
               [[0.5, 0.5], [0.99, 0.01], [0.01, 0.99], [0.4, 0.6]],
               # One real token for C=2: the second slot is empty (sentinel T=4, weight 0).
               [[0.3, 0.7], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]])
  mask = f32([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 0]])
  tokens, weights = routing.expert_choice(probs, 2, mask)
  assert tokens.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(tokens, [[[0, 1], [3, 2]], [[0, 3], [3, 0]], [[0, 4], [0, 4]]])
  np.testing.assert_allclose(
      weights, [[[0.9, 0.6], [0.8, 0.7]], [[0.5, 0.4], [0.6, 0.5]], [[0.3, 0.0], [0.7, 0.0]]],
      rtol=1e-6)
  with pytest.raises(ValueError):
    routing.expert_choice(probs, 5, mask)


def test_expert_choice_fills_every_expert_with_top_real_tokens():
  G, T, E, C = 2, 8, 4, 3
  probs = routing.router_probabilities(jax.random.normal(jax.random.PRNGKey(3), (G, T, E)))
  mask = f32([[1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]])
  tokens, weights = routing.expert_choice(probs, C, mask)
  probs, tokens, weights, real = map(np.asarray, (probs, tokens, weights, mask > 0))
  for g, e in np.ndindex(G, E):
    chosen = tokens[g, e]
    assert len(set(chosen)) == C and real[g, chosen].all()
    np.testing.assert_array_equal(weights[g, e], probs[g, chosen, e])
    others = [t for t in range(T) if real[g, t] and t not in chosen]
    assert max(probs[g, others, e]) <= min(weights[g, e])


# --- Jitter and metrics -------------------------------------------------------------------------


def test_jitter_range_and_identity():
  x = jnp.full((64, 64), 2.0)
  y = routing.jitter(x, jax.random.PRNGKey(0), 0.01)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert float(jnp.min(y)) >= 2.0 * 0.99 and float(jnp.max(y)) <= 2.0 * 1.01
  assert float(jnp.std(y)) > 0.005  # spread across the interval, std 0.02 / sqrt(3)
  np.testing.assert_allclose(jnp.mean(y), 2.0, rtol=1e-3)
  assert not np.array_equal(y, routing.jitter(x, jax.random.PRNGKey(1), 0.01))
  np.testing.assert_array_equal(routing.jitter(x, jax.random.PRNGKey(0), 0.0), x)
  x16 = x.astype(jnp.bfloat16)
  assert routing.jitter(x16, jax.random.PRNGKey(0), 0.01).dtype == jnp.bfloat16


def test_router_entropy_hand_computed():
  # ln 2 and 0 for the real tokens, the uniform padding token does not count: mean ln(2) / 2.
  probs = f32([[[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4]])
  mask = f32([[1, 1, 0]])
  np.testing.assert_allclose(routing.router_entropy(probs, mask), math.log(2.0) / 2, rtol=1e-6)
  uniform = jnp.full((2, 3, 8), 1.0 / 8)
  np.testing.assert_allclose(routing.router_entropy(uniform, jnp.ones((2, 3))), math.log(8.0),
                             rtol=1e-6)
  assert np.isfinite(np.asarray(jax.grad(routing.router_entropy)(probs, mask))).all()


@pytest.mark.parametrize('threshold, k, experts, gates', [
    # Cumulative probability before each of the best: 0, 0.5, 0.8, 0.95.
    (0.7, 4, [0, 1, 4, 4], [0.5, 0.3, 0.0, 0.0]),  # 0.5 < 0.7, then 0.8 reaches it
    (0.5, 4, [0, 4, 4, 4], [0.5, 0.0, 0.0, 0.0]),  # the first alone reaches 0.5
    (1.0, 4, [0, 1, 2, 3], [0.5, 0.3, 0.15, 0.05]),
    (0.99, 2, [0, 1], [0.5, 0.3]),  # the cap
])
def test_top_p_takes_experts_until_their_probability_reaches_the_threshold(threshold, k,
                                                                           experts, gates):
  probs = f32([[[0.5, 0.3, 0.15, 0.05]]])
  chosen, weights = routing.top_p(probs, threshold, k)
  assert chosen.tolist() == [[experts]]
  np.testing.assert_allclose(weights[0, 0], gates, rtol=1e-6)
  _, normalized = routing.top_p(probs, threshold, k, normalize=True)
  np.testing.assert_allclose(normalized[0, 0], np.array(gates) / sum(gates), rtol=1e-6)
