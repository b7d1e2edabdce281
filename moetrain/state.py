"""The model, its optimizer and the train state, created directly in their shardings.

The state is a plain dict `{'step', 'params', 'buffers', 'opt_state', 'rng'}` of (sharded)
arrays: `params` are the model's `nnx.Param`s (what the optimizer updates), `buffers` its other
variables (the routers' balancing biases, updated by the forward pass itself), `rng` the key
data every step's randomness is folded from. Both are pure dicts merged back into the Flax NNX
module inside each jitted step, so nothing Python-side runs per step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moetrain.models.transformer import Transformer
from moetrain.parallel import sharding


def build_model(model_config, seed: int, remat: str = 'none', mesh=None) -> Transformer:
  """The model for `mesh` with its parameters; under `init_state`'s jit they are created
  sharded."""
  return Transformer(model_config, rngs=nnx.Rngs(params=seed), remat=remat, mesh=mesh)


def abstract_model(model_config, mesh, seed: int = 0, remat: str = 'none'):
  """(graphdef, params, buffers) of the model built for `mesh`, nothing allocated: pure dicts
  of jax.ShapeDtypeStructs in the shardings the rules table gives on `mesh`."""
  # jax.eval_shape, unlike nnx.eval_shape, ignores the active mesh (which would read the
  # logical axis names as mesh axes): `sharding` maps them below.
  graphdef, params, buffers = jax.eval_shape(
      lambda: nnx.split(build_model(model_config, seed, remat, mesh), nnx.Param, ...))

  def structs(state):
    return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                        nnx.to_pure_dict(state), sharding.param_shardings(state, mesh))
  return graphdef, structs(params), structs(buffers)


def make_optimizer(train_config):
  """AdamW with warmup + cosine (or constant) schedule; no decay on norms and biases."""
  t = train_config
  if t.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.min_lr_ratio)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
         optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
  adamw = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay,
                      mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw
  return tx, schedule


def decay_mask(params):
  """True for weights that get weight decay: not norm scales, not biases."""
  def decays(path, _):
    name = str(getattr(path[-1], 'key', path[-1]))
    return name != 'scale' and not name.endswith('bias')
  return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: the model's graph, optimizer, mesh and shardings."""
  config: object
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: object
  state_shardings: dict
  batch_sharding: jax.sharding.NamedSharding


def make_setup(config, mesh) -> Setup:
  """Derives the state shardings from the parameters' logical axes, without allocating them."""
  graphdef, abstract_params, abstract_buffers = abstract_model(
      config.model, mesh, config.train.seed, config.train.remat)
  shardings_of = lambda tree: jax.tree.map(lambda s: s.sharding, tree)
  param_shardings = shardings_of(abstract_params)
  tx, schedule = make_optimizer(config.train)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {'step': replicated, 'params': param_shardings,
                     'buffers': shardings_of(abstract_buffers),
                     'opt_state': opt_shardings, 'rng': replicated}
  return Setup(config, mesh, graphdef, tx, schedule, state_shardings,
               sharding.batch_sharding(mesh))


def fresh_weights(setup: Setup, only: tuple = ()):
  """(params, buffers) of a random initialisation, created in the state's shardings; with
  `only` (top-level names, e.g. 'mtp') just those parts, the rest never computed."""
  pick = (lambda tree: {k: v for k, v in tree.items() if k in only}) if only else (lambda t: t)

  def init():
    t = setup.config.train
    model = build_model(setup.config.model, t.seed, t.remat, setup.mesh)
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    return pick(nnx.to_pure_dict(params)), pick(nnx.to_pure_dict(buffers))
  shardings = (pick(setup.state_shardings['params']), pick(setup.state_shardings['buffers']))
  return jax.jit(init, out_shardings=shardings)()


def init_state(setup: Setup, weights=None) -> dict:
  """Creates the train state directly in its shardings (never whole on one device).

  `weights` = (params, buffers) in the state's shardings (a warm start) replace the random
  initialisation; the optimizer, step and RNG start fresh either way.
  """
  params, buffers = fresh_weights(setup) if weights is None else weights

  def init(params, buffers):
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'buffers': buffers,
            'opt_state': setup.tx.init(params),
            'rng': jax.random.key_data(jax.random.key(setup.config.train.seed))}
  return jax.jit(init, out_shardings=setup.state_shardings)(params, buffers)


def abstract_state(setup: Setup) -> dict:
  """The train state as jax.ShapeDtypeStructs carrying its shardings (a restore target)."""
  shapes = jax.eval_shape(lambda: init_state(setup))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=sharding),
                      shapes, setup.state_shardings)
