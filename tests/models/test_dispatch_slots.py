"""Slot-table dispatch (each expert lists its tokens, as expert choice routes) against loops."""

import jax
import jax.numpy as jnp
import numpy as np
from reference_moe import expert_choice_loop_reference

from moetrain.models import dispatch, pipeline

RTOL, ATOL = 1e-5, 1e-6


def cotangent(y):
  # A fixed non-uniform cotangent makes every output element matter.
  return jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)


def expert_weights(seed, E, D, F):
  """Random SwiGLU expert weights, float32, scaled by fan-in."""
  rng = np.random.default_rng(seed)
  return {'w_gate': jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32),
          'w_up': jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32),
          'w_down': jnp.asarray(rng.normal(size=(E, F, D)) / np.sqrt(F), jnp.float32)}


def random_slot_table(seed, G=2, T=6, D=3, E=3, C=4):
  """Each expert picks C distinct tokens (a token may be in several experts); some slots empty."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(G, T, D)), jnp.float32)
  table = np.stack([rng.permutation(T)[:C] for _ in range(G * E)]).reshape(G, E, C)
  table[rng.uniform(size=table.shape) < 0.25] = T  # the sentinel: an empty slot
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(G, E, C)), jnp.float32)
  return x, jnp.asarray(table, jnp.int32), weights


@jax.jit
def slot_backends(x, tokens, weights, y_e, ct_y):
  """Per backend: (dispatch_slots(x), combine_slots(y_e), x, y_e and weight cotangents)."""
  results = {}
  for backend in dispatch.BACKENDS:
    x_e, dispatch_vjp = jax.vjp(lambda x_: dispatch.dispatch_slots(x_, tokens, backend), x)
    y, combine_vjp = jax.vjp(
        lambda y_, w_: dispatch.combine_slots(y_, tokens, w_, x.shape[1], backend), y_e, weights)
    results[backend] = (x_e, y, *dispatch_vjp(y_e), *combine_vjp(ct_y))
  return results


def test_slot_dispatch_and_combine_equal_loops_and_agree_in_gradients():
  x, tokens, weights = random_slot_table(0)
  (G, T, D), (_, E, C) = x.shape, tokens.shape
  table = np.asarray(tokens)
  assert (table == T).any() and (table < T).any()
  rng = np.random.default_rng(1)
  y_e = jnp.asarray(rng.normal(size=(G, E, C, D)), jnp.float32)
  expected_x_e = np.zeros((G, E, C, D), np.float32)
  expected_y = np.zeros((G, T, D), np.float32)
  for g, e, c in np.ndindex(G, E, C):
    if table[g, e, c] < T:
      expected_x_e[g, e, c] = x[g, table[g, e, c]]
      expected_y[g, table[g, e, c]] += weights[g, e, c] * y_e[g, e, c]
  ct_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  results = slot_backends(x, tokens, weights, y_e, ct_y)
  for backend, (x_e, y, *_) in results.items():
    np.testing.assert_array_equal(x_e, expected_x_e, err_msg=backend)  # sentinel reads zeros
    np.testing.assert_allclose(y, expected_y, rtol=RTOL, atol=ATOL, err_msg=backend)
  for got, want in zip(results['capacity'], results['einsum']):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Empty slots add nothing, so their weight and output get no gradient.
  assert np.all(np.asarray(results['capacity'][4])[table == T] == 0.0)
  assert np.all(np.asarray(results['capacity'][3])[table == T] == 0.0)


@jax.jit
def expert_choice_grads(params, tokens):
  """Both slot backends in one compilation: {backend: (grads, y)}."""

  def loss(params, backend):
    y = pipeline.expert_choice(params['x'], tokens, params['weights'],
                               (params['w_gate'], params['w_up'], params['w_down']),
                               backend=backend)
    return jnp.sum(y * cotangent(y)), y

  return {backend: jax.grad(loss, has_aux=True)(params, backend)
          for backend in dispatch.BACKENDS}


def test_expert_choice_ffn_matches_loop_reference_outputs_and_gradients():
  x, tokens, weights = random_slot_table(2, D=4)
  params = dict(x=x, weights=weights, **expert_weights(3, tokens.shape[1], D=4, F=6))

  def reference_loss(params):
    y = expert_choice_loop_reference(params['x'], tokens, params['weights'], params['w_gate'],
                                     params['w_up'], params['w_down'])
    return jnp.sum(y * cotangent(y)), y

  grads_ref, y_ref = jax.grad(reference_loss, has_aux=True)(params)
  unpicked = ~np.isin(np.arange(x.shape[1]), np.asarray(tokens[0]))
  assert unpicked.any()  # a token no expert picked gets exactly zero
  for backend, (grads, y) in expert_choice_grads(params, tokens).items():
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=backend)
    assert np.all(np.asarray(y)[0, unpicked] == 0.0), backend
    for n in params:
      np.testing.assert_allclose(grads[n], grads_ref[n], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{backend} d{n}')
