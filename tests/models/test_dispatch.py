"""Dispatch/combine backends against each other and against the per-token loop reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from pipeline_calls import BACKENDS, dropped_fraction, moe_ffn, token_choice_ffn
from reference_moe import moe_loop_reference, token_choice_loop_reference

from moetrain.models import dispatch, pipeline, routing

RTOL, ATOL = 1e-5, 1e-6
PARAM_NAMES = ('x', 'router_w', 'w_gate', 'w_up', 'w_down')
# One compilation per shape instead of one per op: op-by-op dispatch would compile far more.
assign_slots = jax.jit(dispatch.assign_slots, static_argnums=(2, 3))


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


# (G, T, E, k, capacity, norm_topk_prob, pad, hot, cold). G=2, T=6, D=4, F=6 and E in {4, 6}
# throughout keep the reference's eager per-token ops on few distinct shapes, so few compilations.
CASES = {
    'k1_overflow_empty_pad': (2, 6, 4, 1, 2, False, True, 1, 3),
    'k2_random_pad': (2, 6, 4, 2, 3, True, True, None, None),
    'k2_overflow_empty': (2, 6, 4, 2, 2, False, False, 0, 2),
    'k3_dropless': (2, 6, 6, 3, 6, False, False, None, None),
    'k3_overflow_empty_pad': (2, 6, 6, 3, 3, True, True, 0, 5),
}


@functools.lru_cache(maxsize=None)
def case_data(name):
  G, T, E, k, capacity, norm, pad, hot, cold = CASES[name]
  params, mask = make_case(sum(map(ord, name)), G, T, 4, 6, E, pad=pad, hot=hot, cold=cold)
  settings = dict(top_k=k, norm_topk_prob=norm, capacity=capacity)
  return params, mask, settings, cold


def cotangent(y):
  # A fixed non-uniform cotangent makes every output element matter.
  return jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)


def objective(y, aux_loss, z_loss):
  # The losses are in to check their gradients too.
  return jnp.sum(y * cotangent(y)) + 0.3 * aux_loss + 0.1 * z_loss


def package_objective(params, mask, backend, **settings):
  y, aux = moe_ffn(*(params[n] for n in PARAM_NAMES), mask_GxT=mask, backend=backend,
                   **settings)
  return objective(y, aux['aux_loss'], aux['z_loss']), (y, aux)


@functools.partial(jax.jit, static_argnames=('top_k', 'norm_topk_prob', 'capacity'))
def package_grads(params, mask, **settings):
  """All backends in one compilation: {backend: (grads, (y, aux))}."""
  grad_fn = jax.grad(package_objective, has_aux=True)
  return {backend: grad_fn(params, mask, backend, **settings) for backend in BACKENDS}


def assert_capacity_equals_einsum(results, names):
  """The gather path's outputs and gradients against the one-hot einsum reference's."""
  (grads, (y, _)), (grads_ref, (y_ref, _)) = results['capacity'], results['einsum']
  np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg='capacity vs einsum')
  for n in names:
    np.testing.assert_allclose(grads[n], grads_ref[n], rtol=RTOL, atol=ATOL,
                               err_msg=f'capacity vs einsum d{n}')


def reference_forward(params, mask, settings, priority=False):
  weights = (params[n] for n in PARAM_NAMES[1:])
  return moe_loop_reference(params['x'], mask, *weights, **settings, priority=priority)


@functools.lru_cache(maxsize=None)
def reference_results(name, capacity):
  """Loop reference of CASES[name] at `capacity`, in one pass: -> (y, info, grads)."""
  params, mask, settings, _ = case_data(name)
  settings = dict(settings, capacity=capacity)
  decisions = {}

  def reference_objective(params):
    y, info = reference_forward(params, mask, settings)
    # Drop sets and counts are concrete Python values, safe to keep from inside the trace.
    decisions.update((k, info[k]) for k in ('dropped', 'slots', 'expert_fraction',
                                            'dropped_fraction'))
    return objective(y, info['aux_loss'], info['z_loss']), (y, info['aux_loss'], info['z_loss'])

  grads, (y, aux_loss, z_loss) = jax.grad(reference_objective, has_aux=True)(params)
  return y, dict(decisions, aux_loss=aux_loss, z_loss=z_loss), grads


@pytest.mark.parametrize('name', sorted(CASES))
def test_moe_ffn_matches_loop_reference_outputs_and_gradients(name):
  _, mask, settings, cold = case_data(name)
  capacity, tokens = settings['capacity'], mask.shape[1]
  if cold is not None:  # the scenario really has an idle expert and overflow
    info = reference_results(name, capacity)[1]
    assert info['expert_fraction'][cold] == 0.0
    assert info['dropped_fraction'] > 0.0

  params = case_data(name)[0]
  results = package_grads(params, mask, **settings)
  assert_capacity_equals_einsum(results, PARAM_NAMES)
  for backend, (grads, (y, aux)) in results.items():
    # Dropless equals the reference with capacity T.
    y_ref, info, grads_ref = reference_results(name, tokens if backend == 'dropless' else capacity)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=backend)
    for key in ('aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
      np.testing.assert_allclose(aux[key], info[key], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} {key}')
    for n in PARAM_NAMES:
      np.testing.assert_allclose(grads[n], grads_ref[n], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} d{n}')


@functools.partial(jax.jit, static_argnames=('top_k', 'norm_topk_prob'))
def package_routing(x, router_w, *, top_k, norm_topk_prob):
  """The package's choices and top router probabilities: -> (experts [G, T, K], [G, T])."""
  probs = routing.router_probabilities(jnp.einsum('gtd,de->gte', x, router_w))
  _, experts = routing.top_k_gates(probs, top_k, norm_topk_prob)
  return experts, jnp.max(probs, axis=-1)


@pytest.mark.parametrize('policy', ['position', 'priority'])
@pytest.mark.parametrize('name', sorted(CASES))
def test_assign_slots_drops_exactly_what_reference_drops(name, policy):
  params, mask, settings, _ = case_data(name)
  if policy == 'priority':
    _, info = reference_forward(params, mask, settings, priority=True)
  else:
    info = reference_results(name, settings['capacity'])[1]
  experts, top_prob = package_routing(params['x'], params['router_w'], top_k=settings['top_k'],
                                      norm_topk_prob=settings['norm_topk_prob'])
  num_experts = params['router_w'].shape[-1]
  slots, kept = assign_slots(experts, mask, num_experts, settings['capacity'],
                             priority_GxT=top_prob if policy == 'priority' else None)
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


@functools.partial(jax.jit, static_argnums=2)
def slots_both_ways(experts, real, num_experts):
  return (dispatch._onehot_position_slots(experts, real, num_experts),
          dispatch._sorted_position_slots(experts, real, num_experts))


@pytest.mark.parametrize('E', [4, dispatch.SORT_SLOTS_MIN_EXPERTS + 3])
def test_sorted_and_onehot_slot_assignment_agree(E):
  # Three popular choices (maybe the null expert, index E), so that slots run past the mean
  # load; null experts and padding take no slot.
  G, T, k = 2, 40, 3
  rng = np.random.default_rng(E)
  popularity = np.ones(E + 1)
  popularity[rng.choice(E + 1, size=3, replace=False)] = 10.0  # maybe the null expert too
  experts = np.stack([rng.choice(E + 1, size=k, replace=False, p=popularity / popularity.sum())
                      for _ in range(G * T)]).reshape(G, T, k)
  real = (rng.uniform(size=(G, T, 1)) > 0.2) & (experts < E)
  onehot, by_sort = map(np.asarray, slots_both_ways(jnp.asarray(experts, jnp.int32),
                                                    jnp.asarray(real), E))
  np.testing.assert_array_equal(by_sort, onehot)
  assert onehot.max() >= T * k // E and not onehot[~real].any()


def test_priority_serves_first_choices_by_priority_then_second_choices():
  # One group, E = 2, C = 2; expert 2 is a null expert.
  experts = jnp.array([[[0, 1], [0, 2], [1, 0], [0, 1]]], jnp.int32)
  priority = jnp.array([[0.1, 0.9, 0.5, 0.9]])  # tokens 1 and 3 tie: token 1 goes first
  mask = jnp.ones((1, 4))
  slots, kept = assign_slots(experts, mask, 2, 2, priority_GxT=priority)
  # First choices in order 1, 3, 2, 0: expert 0 takes tokens 1 and 3, expert 1 token 2, and
  # token 0's first choice overflows. Then second choices: expert 1 takes token 3 (slot 1);
  # token 2's (expert 0) and token 0's (expert 1) overflow; token 1's is null.
  np.testing.assert_array_equal(kept, [[[False, False], [True, False], [True, False],
                                        [True, True]]])
  np.testing.assert_array_equal(np.where(kept, slots, -1),
                                [[[-1, -1], [0, -1], [0, -1], [1, 1]]])
  _, kept_by_position = assign_slots(experts, mask, 2, 2)
  np.testing.assert_array_equal(kept_by_position, [[[True, True], [True, False], [True, False],
                                                    [False, False]]])
  fraction = dropped_fraction(kept, mask, experts, 2)
  np.testing.assert_allclose(fraction, 3 / 7)  # the null choice is no drop


def test_fully_dropped_and_padding_tokens_get_exactly_zero():
  params, mask, settings, _ = case_data('k1_overflow_empty_pad')
  info = reference_results('k1_overflow_empty_pad', settings['capacity'])[1]
  padding = set(zip(*np.nonzero(np.asarray(mask) == 0)))
  fully_dropped = {(g, t) for g, t, _ in info['dropped']}  # k = 1: one drop loses the whole token
  assert fully_dropped
  for backend, (_, (y, _)) in package_grads(params, mask, **settings).items():
    y = np.asarray(y)
    expected_zero = padding | (set() if backend == 'dropless' else fully_dropped)
    for g, t in expected_zero:
      assert np.all(y[g, t] == 0.0), (backend, g, t)


# Token choice with given choices: (G, T, E, k, capacity, null experts, padding, priority).
# Expert E - 1 is never chosen; expert 0 is most tokens' first choice, so it overflows.
# With null experts, token 2 of each group chooses the null expert E first.
TOKEN_CHOICE_CASES = {
    'k1_null_priority_pad': (2, 6, 4, 1, 2, 2, True, True),
    'k2_null_position_pad': (2, 6, 4, 2, 2, 1, True, False),
    'k3_null_priority': (2, 6, 6, 3, 3, 2, False, True),
    'k4_null_position_pad': (2, 6, 6, 4, 3, 1, True, False),
}
TOKEN_CHOICE_PARAMS = ('x', 'weights', 'w_gate', 'w_up', 'w_down')


@functools.lru_cache(maxsize=None)
def token_choice_data(name):
  G, T, E, k, capacity, nulls, pad, use_priority = TOKEN_CHOICE_CASES[name]
  params, mask = make_case(sum(map(ord, name)), G, T, 4, 6, E, pad=pad)
  rng = np.random.default_rng(sum(map(ord, name)) + 1)
  choices = [e for e in range(E + nulls) if e != E - 1]
  rows = []
  for i in range(G * T):
    if nulls and i % T == 2:  # a null first choice; with k = 1 no real expert at all
      first = [E]
    elif rng.uniform() < 0.6:
      first = [0]
    else:
      first = []
    rest = [e for e in rng.permutation(choices) if e not in first]
    rows.append(first + rest[:k - len(first)])
  params = {n: params[n] for n in ('x', 'w_gate', 'w_up', 'w_down')}
  params['weights'] = jnp.asarray(rng.uniform(0.1, 1.0, size=(G, T, k)), jnp.float32)
  experts = jnp.asarray(np.array(rows).reshape(G, T, k), jnp.int32)
  # Few distinct values, so that equal priorities occur.
  priority = (jnp.asarray(rng.integers(0, 3, size=(G, T)) / 2, jnp.float32) if use_priority
              else None)
  return params, experts, mask, priority, capacity


@functools.partial(jax.jit, static_argnames=('capacity',))
def token_choice_grads(params, experts, mask, priority, capacity):
  """All backends in one compilation: {backend: (grads, (y, kept))}."""

  def loss(params, backend):
    y, kept = token_choice_ffn(
        params['x'], experts, params['weights'], mask, params['w_gate'], params['w_up'],
        params['w_down'], capacity=capacity, backend=backend, priority_GxT=priority)
    return jnp.sum(y * cotangent(y)), (y, kept)

  return {backend: jax.grad(loss, has_aux=True)(params, backend) for backend in BACKENDS}


def token_choice_reference(params, experts, mask, priority, capacity):
  return token_choice_loop_reference(
      params['x'], mask, experts, params['weights'], params['w_gate'], params['w_up'],
      params['w_down'], capacity=capacity, priority_GxT=priority)


@pytest.mark.parametrize('name', sorted(TOKEN_CHOICE_CASES))
def test_token_choice_ffn_matches_loop_reference_outputs_and_gradients(name):
  params, experts, mask, priority, capacity = token_choice_data(name)
  num_experts = params['w_gate'].shape[0]
  tokens = mask.shape[1]
  real = (np.asarray(mask) > 0)[..., None]
  null = np.asarray(experts) >= num_experts
  references = {}
  for c in (capacity, tokens):  # dropless equals the reference with C = T
    decisions = {}

    def reference_loss(params):
      y, info = token_choice_reference(params, experts, mask, priority, c)
      decisions.update(info)  # concrete Python values, safe to keep from inside the trace
      return jnp.sum(y * cotangent(y)), y

    grads_ref, y_ref = jax.grad(reference_loss, has_aux=True)(params)
    references[c] = y_ref, decisions, grads_ref
  assert references[capacity][1]['dropped'] and not references[tokens][1]['dropped']
  assert (real & null).any()

  results = token_choice_grads(params, experts, mask, priority, capacity)
  assert_capacity_equals_einsum(results, TOKEN_CHOICE_PARAMS)
  for backend, (grads, (y, kept)) in results.items():
    y_ref, info, grads_ref = references[tokens if backend == 'dropless' else capacity]
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=backend)
    for n in TOKEN_CHOICE_PARAMS:
      np.testing.assert_allclose(grads[n], grads_ref[n], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} d{n}')
    kept = np.asarray(kept)
    assert set(zip(*np.nonzero(real & ~null & ~kept))) == info['dropped'], backend
    assert not (kept & (null | ~real)).any(), backend
    fraction = dropped_fraction(kept, mask, experts, num_experts)
    np.testing.assert_allclose(fraction, info['dropped_fraction'], rtol=RTOL, err_msg=backend)
    # Null, dropped and padding assignments add exactly nothing and get no gate gradient.
    assert np.all(np.asarray(grads['weights'])[~kept] == 0.0), backend
    unserved = ~kept.any(-1)
    assert np.all(np.asarray(y)[unserved] == 0.0), backend
    if name == 'k1_null_priority_pad':  # some real tokens chose only the null expert
      assert (unserved & real[..., 0] & null[..., 0]).any()


def float_scatters(jaxpr):
  """Names of the scatter equations with a float output anywhere in a (closed) jaxpr."""
  found = []
  for eqn in jaxpr.eqns:
    if 'scatter' in eqn.primitive.name and any(
        jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
      found.append(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += float_scatters(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += float_scatters(sub)
  return found


def test_capacity_forward_and_backward_move_token_vectors_by_gathers_only():
  params, experts, mask, priority, capacity = token_choice_data('k2_null_position_pad')

  def loss(params, backend):
    y, _ = token_choice_ffn(
        params['x'], experts, params['weights'], mask, params['w_gate'], params['w_up'],
        params['w_down'], capacity=capacity, backend=backend, priority_GxT=priority)
    return jnp.sum(y * cotangent(y))

  # Only the int slot table is scattered.
  grad_jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, 'capacity')
  assert float_scatters(grad_jaxpr.jaxpr) == []
  # The check does see scatters: the slot-table path's combine scatter-adds.
  tokens = jnp.full((2, 3, 2), 1, jnp.int32)
  combine_slots = lambda y: dispatch.combine_slots(y, tokens, jnp.ones((2, 3, 2)), 4)
  assert float_scatters(jax.make_jaxpr(combine_slots)(jnp.ones((2, 3, 2, 5))).jaxpr)


def random_routing(seed, G=2, T=7, D=3, E=4, k=2, capacity=3):
  """Random choices among E experts and one null expert (index E)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(G, T, D)), jnp.float32)
  experts = np.stack([rng.permutation(E + 1)[:k] for _ in range(G * T)]).reshape(G, T, k)
  experts = jnp.asarray(experts, jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(G, T, k)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(G, T)) > 0.2, jnp.float32)
  slots, kept = assign_slots(experts, mask, E, capacity)
  return x, experts, weights, slots, kept, E, capacity


@functools.partial(jax.jit, static_argnames=('num_experts', 'capacity'))
def capacity_backends(x, experts, slots, kept, weights, y_e, ct_x_e, ct_y, *, num_experts,
                      capacity):
  """Per backend: (dispatch(x), combine(y_e), x cotangent, y_e and weight cotangents)."""
  results = {}
  for backend in dispatch.BACKENDS:
    x_e, dispatch_vjp = jax.vjp(
        lambda x_: dispatch.dispatch(x_, experts, slots, kept, num_experts, capacity, backend), x)
    y, combine_vjp = jax.vjp(
        lambda y_, w_: dispatch.combine(y_, experts, slots, kept, w_, backend), y_e, weights)
    results[backend] = (x_e, y, *dispatch_vjp(ct_x_e), *combine_vjp(ct_y))
  return results


def test_dispatch_fills_buffers_and_combine_weights_kept_outputs():
  x, experts, weights, slots, kept, E, C = random_routing(0)
  assert not np.asarray(kept).all() and np.asarray(kept).any()
  assert (np.asarray(experts) == E).any()
  expected = np.zeros((x.shape[0], E, C, x.shape[2]), np.float32)
  for g, t, j in zip(*np.nonzero(np.asarray(kept))):
    expected[g, experts[g, t, j], slots[g, t, j]] = x[g, t]
  scale = np.sum(np.where(kept, weights, 0.0), axis=-1, keepdims=True)
  # Combining the dispatched buffers is running identity experts: each token gets back x times
  # its kept gate weights.
  results = capacity_backends(x, experts, slots, kept, weights, expected, expected, x,
                              num_experts=E, capacity=C)
  for backend, (x_e, y, *_) in results.items():
    np.testing.assert_array_equal(x_e, expected, err_msg=backend)  # empty slots exactly zero
    np.testing.assert_allclose(y, x * scale, rtol=RTOL, atol=ATOL, err_msg=backend)


def test_dispatch_and_combine_gradients_agree_across_backends():
  x, experts, weights, slots, kept, E, C = random_routing(1)
  rng = np.random.default_rng(2)
  y_e = jnp.asarray(rng.normal(size=(x.shape[0], E, C, x.shape[2])), jnp.float32)
  ct_x_e = jnp.asarray(rng.normal(size=y_e.shape), jnp.float32)
  ct_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  results = capacity_backends(x, experts, slots, kept, weights, y_e, ct_x_e, ct_y,
                              num_experts=E, capacity=C)
  for got, want in zip(results['capacity'], results['einsum']):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Dropped, null and padding assignments get no gradient on their gate weight.
  assert np.all(np.asarray(results['capacity'][4])[~np.asarray(kept)] == 0.0)


def test_dropped_fraction_counts_only_real_expert_assignments():
  kept = jnp.array([[[True, False], [False, False], [True, False]]])
  experts = jnp.array([[[0, 1], [1, 0], [1, 2]]])  # expert 2 is null (E = 2)
  mask = jnp.array([[1.0, 0.0, 1.0]])
  # Real-expert assignments of real tokens: token 0 (1 of 2 dropped) and token 2 (its first
  # choice, kept; the second is null) -> 1 / 3.
  fraction = dropped_fraction(kept, mask, experts, 2)
  np.testing.assert_allclose(fraction, 1 / 3)


def test_unknown_backend_raises():
  x, experts, weights, slots, kept, E, C = random_routing(3)
  with pytest.raises(ValueError, match='bogus'):
    dispatch.dispatch(x, experts, slots, kept, E, C, 'bogus')
  with pytest.raises(ValueError, match='dropless'):  # dropless has no capacity buffers
    dispatch.dispatch(x, experts, slots, kept, E, C, 'dropless')
  y_e = jnp.zeros((x.shape[0], E, C, x.shape[2]))
  with pytest.raises(ValueError, match='bogus'):
    dispatch.combine(y_e, experts, slots, kept, weights, 'bogus')
  params, mask, settings, _ = case_data('k3_dropless')
  with pytest.raises(ValueError, match='bogus'):
    package_objective(params, mask, 'bogus', **settings)
  tokens = jnp.zeros((x.shape[0], E, C), jnp.int32)
  w = jnp.zeros((E, x.shape[2], 2))
  with pytest.raises(ValueError, match='dropless'):
    pipeline.expert_choice(x, tokens, tokens * 1.0, (w, w, w.transpose(0, 2, 1)),
                           backend='dropless')
