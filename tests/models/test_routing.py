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
