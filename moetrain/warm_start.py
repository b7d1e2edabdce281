"""Starting a run from existing weights instead of a random initialisation.

`init.from_checkpoint` takes the weights of another run or of a converted checkpoint;
`init.upcycle_from` turns dense checkpoints into this MoE model (`upcycle.py`). Weights are
restored in their shardings and transformed inside one jitted function, so no host ever holds
the whole model; the optimizer and step start fresh.
"""

import jax

from moetrain import checkpoint, upcycle
from moetrain.errors import ConfigError
from moetrain.models import layout
from moetrain.state import abstract_model, fresh_weights


def _restore(field: str, directory: str, model_config, mesh, config=None, without=()):
  """(params, buffers) of the checkpoint, but for the top-level parts `without`."""
  try:
    _, params, buffers = abstract_model(model_config, mesh)
    drop = lambda tree: {k: v for k, v in tree.items() if k not in without}
    return checkpoint.restore_weights(directory, drop(params), drop(buffers), config)
  except ConfigError as error:
    raise ConfigError(f'{field}={directory}: {error}') from error


def _fresh_parts(directory: str, model_config) -> tuple:
  """('mtp',) when the run has multi-token-prediction modules and the checkpoint none (a
  converted model saved without them): they start fresh, everything else is restored."""
  if not model_config.mtp_layers:
    return ()
  try:
    saved = checkpoint.model_config(directory).model.mtp_layers
  except ConfigError:
    return ()  # the restore names what is wrong
  return ('mtp',) if not saved else ()


def initial_weights(setup, log=lambda line: None):
  """(params, buffers) the config's `init` section asks for, in the state's shardings; None
  for a random initialisation. Errors name the `init` field; `log` gets a line for modules
  that start fresh."""
  config, mesh = setup.config, setup.mesh
  if config.init.from_checkpoint:
    fresh = _fresh_parts(config.init.from_checkpoint, config.model)
    if fresh:
      log(f'init.from_checkpoint={config.init.from_checkpoint} has no multi-token-prediction '
          f'modules, so the {config.model.mtp_layers} here start fresh')
    params, buffers = _restore('init.from_checkpoint', config.init.from_checkpoint,
                               config.model, mesh, config, without=fresh)
    place = lambda tree, where: jax.tree.map(jax.device_put, tree,
                                             {k: where[k] for k in tree})
    params = place(params, setup.state_shardings['params'])
    buffers = place(buffers, setup.state_shardings['buffers'])
    if fresh:
      fresh_params, fresh_buffers = fresh_weights(setup, only=fresh)
      params, buffers = {**params, **fresh_params}, {**buffers, **fresh_buffers}
    return params, buffers
  if config.init.upcycle_from:
    return upcycled_weights(setup)
  return None


def upcycled_weights(setup):
  """This MoE model's (params, buffers) upcycled from the dense checkpoints `init.upcycle_from`
  names (comma-separated, one per expert group)."""
  config, mesh = setup.config, setup.mesh
  dense = []
  for directory in [d.strip() for d in config.init.upcycle_from.split(',') if d.strip()]:
    try:
      dense_config = checkpoint.model_config(directory).model
    except ConfigError as error:
      raise ConfigError(f'init.upcycle_from={directory}: {error}') from error
    if dense_config.moe.num_experts:
      raise ConfigError(f'init.upcycle_from={directory}: holds an MoE model; upcycling starts '
                        'from dense ones (model.moe.num_experts=0)')
    dense.append((dense_config, _restore('init.upcycle_from', directory, dense_config, mesh)[0]))
  fresh_params, buffers = fresh_weights(setup)

  def build(dense_params, fresh_params):
    flat = [layout.to_layers(params, c) for (c, _), params in zip(dense, dense_params)]
    target = layout.to_layers(fresh_params, config.model)
    out = upcycle.upcycle(flat, target, config.model, config.init,
                          jax.random.key(config.train.seed))
    return layout.from_layers(out, config.model)
  try:
    params = jax.jit(build, out_shardings=setup.state_shardings['params'])(
        [params for _, params in dense], fresh_params)
  except ValueError as error:
    raise ConfigError(f'init.upcycle_from: {error}') from error
  return params, buffers
