"""Shared by the tests that compare one step across meshes: random batches and first steps."""

import functools

import jax
import numpy as np

from moetrain import trainer
from moetrain.parallel.mesh import make_mesh
from moetrain.state import init_state, make_setup
from moetrain.steps import gradients, make_train_step


def random_batch(config, seed=0, padding=0):
  """A batch of random tokens; the last row ends in `padding` PAD tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, config.model.vocab_size,
                        (config.train.batch_size, config.train.seq_len + 1))
  if padding:
    tokens[-1, -padding:] = 0  # masked out of the loss and routing
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32)}


def first_gradients(config, devices, local_batch, then=None):
  """(grads, metrics, new buffers) of step one of `config` on `devices`, and its initial state.

  `then(setup, state, batch)`, if given, runs under the same mesh and its result is appended.
  """
  mesh = make_mesh(config, devices)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    state = init_state(setup)
    batch = trainer.global_batch(setup, local_batch)
    out = jax.jit(functools.partial(gradients, setup))(
        state['params'], state['buffers'], batch, jax.random.key(0))
    result = jax.device_get((out, state))
    if then is not None:
      result += (then(setup, state, batch),)
    return result


def train(config, devices, batch_at, steps: int, metric: str = 'loss'):
  """(`metric` of each of `steps` train steps of `config` on `devices`, the last step's
  metrics, the last state); `batch_at(i)` is step i's local batch."""
  mesh = make_mesh(config, devices)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    state, step, values = init_state(setup), make_train_step(setup), []
    for i in range(steps):
      state, metrics = step(state, trainer.global_batch(setup, batch_at(i)))
      values.append(metrics[metric])
    return np.array(jax.device_get(values), np.float64), jax.device_get(metrics), state


def compiled_train_step(config, devices) -> str:
  """The optimised HLO text of `config`'s train step on `devices`."""
  mesh = make_mesh(config, devices)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    state = init_state(setup)
    batch = trainer.global_batch(setup, random_batch(config))
    return make_train_step(setup).lower(state, batch).compile().as_text()
