"""Which differences between a checkpoint's model config and this run's keep its weights from
loading: those that change the shape of a parameter or buffer, not loss weights or routing."""

import copy
import json

import jax
from flax import nnx

from moetrain import config as config_lib
from moetrain.models.layout import flatten, unflatten
from moetrain.state import build_model


def _shapes(model_config) -> dict:
  """{path: shape} of every parameter and buffer of the model, nothing allocated."""
  state = jax.eval_shape(lambda: nnx.state(build_model(model_config, 0)))
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def blocking_fields(saved: dict, config) -> list[str]:
  """`model.field=saved→current` for each model field of `saved` (a checkpoint's config, a
  nested dict) whose saved value alone, put back into `config`, changes an array's shape.
  Fields `saved` lacks (an older checkpoint) count at their defaults."""
  schema = json.loads(config_lib.default_config().model.to_json_best_effort())
  old = {**flatten({'model': schema}), **flatten({'model': saved.get('model', {})})}
  new = flatten({'model': json.loads(config.model.to_json_best_effort())})
  wanted = _shapes(config.model)
  blocking = []
  for name in sorted(set(old) & set(new)):
    if old[name] == new[name]:
      continue
    trial = copy.deepcopy(config)
    try:
      config_lib.update_from_dict(trial, unflatten({name: old[name]}), 'checkpoint')
      blocks = _shapes(trial.model) != wanted
    except Exception:  # noqa: BLE001
      # It cannot go back alone (a wrong type, or a model that needs other fields changed with
      # it): it is part of what differs.
      blocks = True
    if blocks:
      blocking.append(f'{name.replace("/", ".")}={old[name]!r}→{new[name]!r}')
  return blocking
