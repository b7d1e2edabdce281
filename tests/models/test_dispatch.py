"""Dispatch/combine backends against each other and against the per-token loop reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_moe import moe_loop_reference

from moetrain.models import dispatch, routing

RTOL, ATOL = 1e-5, 1e-6
PARAM_NAMES = ('x', 'router_w', 'w_gate', 'w_up', 'w_down')


def make_case(seed, G, T, D, F, E, *, pad=False, hot=None, cold=None):
  """Random float32 inputs; `hot`/`cold` make one expert picked by (nearly) all / no tokens."""
  rng = np.random.default_rng(seed)
  params = {
      'x': rng.normal(size=(G, T, D)),
      'router_w': 0.5 * rng.normal(size=(D, E)),
      'w_gate': rng.normal(size=(E, D, F)) / np.sqrt(D),
      'w_up': rng.normal(size=(E, D, F)) / np.sqrt(D),
      'w_down': rng.normal(size=(E, F, D)) / np.sqrt(F),
  }
  if hot is not None or cold is not None:
    # A constant input feature turns router row 0 into a per-expert bias.
    params['x'][..., 0] = 1.0
    params['router_w'][0, hot] = 6.0
    params['router_w'][0, cold] = -6.0
  mask = np.ones((G, T), np.float32)
  if pad:
    # Padding inside a group (packed sequences) and at the end of the last group.
    mask[0, 1] = 0.0
    mask[-1, -3:] = 0.0
  params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
  return params, jnp.asarray(mask)


# (G, T, E, k, capacity, norm_topk_prob, pad, hot, cold). D=4 and F=6 throughout keep the
# reference's eager per-token ops on few distinct shapes, so few compilations.
CASES = {
    'k1_overflow_empty_pad': (2, 8, 4, 1, 2, False, True, 1, 3),
    'k2_random_pad': (2, 6, 4, 2, 3, True, True, None, None),
    'k2_overflow_empty': (3, 4, 3, 2, 2, False, False, 0, 2),
    'k3_dropless': (1, 5, 5, 3, 5, False, False, None, None),
    'k3_overflow_empty_pad': (2, 6, 6, 3, 3, True, True, 0, 5),
}


@functools.lru_cache(maxsize=None)
def case_data(name):
  G, T, E, k, capacity, norm, pad, hot, cold = CASES[name]
  params, mask = make_case(sum(map(ord, name)), G, T, 4, 6, E, pad=pad, hot=hot, cold=cold)
  settings = dict(top_k=k, norm_topk_prob=norm, capacity=capacity)
  return params, mask, settings, cold


def objective(y, aux_loss, z_loss):
  # A fixed non-uniform cotangent makes every output element matter; the losses are in to check
  # their gradients too.
  ct = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  return jnp.sum(y * ct) + 0.3 * aux_loss + 0.1 * z_loss


def package_objective(params, mask, backend, **settings):
  y, aux = dispatch.moe_ffn(*(params[n] for n in PARAM_NAMES), mask_GxT=mask, backend=backend,
                            **settings)
  return objective(y, aux['aux_loss'], aux['z_loss']), (y, aux)


@functools.partial(jax.jit, static_argnames=('top_k', 'norm_topk_prob', 'capacity'))
def package_grads(params, mask, **settings):
  """Both backends in one compilation: {backend: (grads, (y, aux))}."""
  grad_fn = jax.grad(package_objective, has_aux=True)
  return {backend: grad_fn(params, mask, backend, **settings) for backend in dispatch.BACKENDS}


def reference_objective(params, mask, settings):
  y, info = reference_forward(params, mask, settings)
  return objective(y, info['aux_loss'], info['z_loss'])


def reference_forward(params, mask, settings):
  weights = (params[n] for n in PARAM_NAMES[1:])
  return moe_loop_reference(params['x'], mask, *weights, **settings)


@pytest.mark.parametrize('name', sorted(CASES))
def test_moe_ffn_matches_loop_reference_outputs_and_gradients(name):
  params, mask, settings, cold = case_data(name)
  y_ref, info = reference_forward(params, mask, settings)
  if cold is not None:  # the scenario really has an idle expert and overflow
    assert info['expert_fraction'][cold] == 0.0
    assert info['dropped_fraction'] > 0.0
  grads_ref = jax.grad(reference_objective)(params, mask, settings)

  for backend, (grads, (y, aux)) in package_grads(params, mask, **settings).items():
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=backend)
    for key in ('aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
      np.testing.assert_allclose(aux[key], info[key], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} {key}')
    for n in PARAM_NAMES:
      np.testing.assert_allclose(grads[n], grads_ref[n], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} d{n}')


@pytest.mark.parametrize('name', sorted(CASES))
def test_assign_slots_drops_exactly_what_reference_drops(name):
  params, mask, settings, _ = case_data(name)
  _, info = reference_forward(params, mask, settings)
  logits = jnp.einsum('gtd,de->gte', params['x'], params['router_w'])
  probs = routing.router_probabilities(logits)
  _, experts = routing.top_k_gates(probs, settings['top_k'], settings['norm_topk_prob'])
  num_experts = probs.shape[-1]
  slots, kept = dispatch.assign_slots(experts, mask, num_experts, settings['capacity'])
  experts, slots, kept = np.asarray(experts), np.asarray(slots), np.asarray(kept)
  real = np.asarray(mask) > 0

  assert set(zip(*np.nonzero(real[..., None] & ~kept))) == info['dropped']
  assert {(g, t, j): slots[g, t, j] for g, t, j in zip(*np.nonzero(kept))} == info['slots']
  assert not kept[~real].any()
  for g in range(experts.shape[0]):
    for e in range(num_experts):
      kept_slots = sorted(slots[g][kept[g] & (experts[g] == e)])
      assert kept_slots == list(range(len(kept_slots)))  # distinct, packed from 0
      assert len(kept_slots) <= settings['capacity']


def test_fully_dropped_and_padding_tokens_get_exactly_zero():
  params, mask, settings, _ = case_data('k1_overflow_empty_pad')
  _, info = reference_forward(params, mask, settings)
  padding = set(zip(*np.nonzero(np.asarray(mask) == 0)))
  fully_dropped = {(g, t) for g, t, _ in info['dropped']}  # k = 1: one drop loses the whole token
  assert fully_dropped
  for backend, (_, (y, _)) in package_grads(params, mask, **settings).items():
    y = np.asarray(y)
    for g, t in fully_dropped | padding:
      assert np.all(y[g, t] == 0.0), (backend, g, t)


def random_routing(seed, G=2, T=7, D=3, E=4, k=2, capacity=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(G, T, D)), jnp.float32)
  experts = np.stack([rng.permutation(E)[:k] for _ in range(G * T)]).reshape(G, T, k)
  experts = jnp.asarray(experts, jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(G, T, k)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(G, T)) > 0.2, jnp.float32)
  slots, kept = dispatch.assign_slots(experts, mask, E, capacity)
  return x, experts, weights, slots, kept, E, capacity


def test_dispatch_fills_buffers_and_combine_weights_kept_outputs():
  x, experts, weights, slots, kept, E, C = random_routing(0)
  assert not np.asarray(kept).all() and np.asarray(kept).any()
  expected = np.zeros((x.shape[0], E, C, x.shape[2]), np.float32)
  for g, t, j in zip(*np.nonzero(np.asarray(kept))):
    expected[g, experts[g, t, j], slots[g, t, j]] = x[g, t]
  scale = np.sum(np.where(kept, weights, 0.0), axis=-1, keepdims=True)
  for backend in dispatch.BACKENDS:
    x_e = dispatch.dispatch(x, experts, slots, kept, E, C, backend)
    np.testing.assert_array_equal(x_e, expected, err_msg=backend)  # empty slots exactly zero
    # With identity experts each token gets back x times its kept gate weights.
    y = dispatch.combine(x_e, experts, slots, kept, weights, backend)
    np.testing.assert_allclose(y, x * scale, rtol=RTOL, atol=ATOL, err_msg=backend)


def test_dispatch_and_combine_gradients_agree_across_backends():
  x, experts, weights, slots, kept, E, C = random_routing(1)
  rng = np.random.default_rng(2)
  y_e = jnp.asarray(rng.normal(size=(x.shape[0], E, C, x.shape[2])), jnp.float32)
  ct_x_e = jnp.asarray(rng.normal(size=y_e.shape), jnp.float32)
  ct_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  results = {}
  for backend in dispatch.BACKENDS:
    _, dispatch_vjp = jax.vjp(
        lambda x_: dispatch.dispatch(x_, experts, slots, kept, E, C, backend), x)
    y, combine_vjp = jax.vjp(
        lambda y_, w_: dispatch.combine(y_, experts, slots, kept, w_, backend), y_e, weights)
    results[backend] = (y, *dispatch_vjp(ct_x_e), *combine_vjp(ct_y))
  for got, want in zip(results['capacity'], results['einsum']):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Dropped and padding assignments get no gradient on their gate weight.
  assert np.all(np.asarray(results['capacity'][3])[~np.asarray(kept)] == 0.0)


def test_dropped_fraction_counts_only_real_assignments():
  kept = jnp.array([[[True, False], [False, False], [True, True]]])
  mask = jnp.array([[1.0, 0.0, 1.0]])
  # Real assignments: token 0 (1 of 2 dropped) and token 2 (none dropped) -> 1 / 4.
  assert float(dispatch.dropped_fraction(kept, mask)) == 0.25


def test_unknown_backend_raises():
  x, experts, weights, slots, kept, E, C = random_routing(3)
  with pytest.raises(ValueError, match='bogus'):
    dispatch.dispatch(x, experts, slots, kept, E, C, 'bogus')
  y_e = jnp.zeros((x.shape[0], E, C, x.shape[2]))
  with pytest.raises(ValueError, match='bogus'):
    dispatch.combine(y_e, experts, slots, kept, weights, 'bogus')
  params, mask, settings, _ = case_data('k3_dropless')
  with pytest.raises(ValueError, match='bogus'):
    package_objective(params, mask, 'bogus', **settings)
