"""Orbax checkpoints of a run: asynchronous saves, retention, restore onto any mesh, bad ones
skipped.

Each checkpoint is a step directory under `WORKDIR/checkpoints` with three items: `state` (step,
params, buffers such as router biases, optimizer state, the RNG key), `progress` (the data
position, JSON: for the embedded corpus a count of global rows consumed, so any number of
processes can resume it; for document sources each process's grain iterator state)
and `config` (the run's config; JSON). Orbax finalises a step directory only when all of it is
written, so an interrupted save is never listed; a finalised one that cannot be read is reported
by name, set aside as `STEP.unreadable` and the previous one restored.
"""

import contextlib
import json
import logging
import signal
import uuid

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from etils import epath

from moetrain import config as config_lib
from moetrain import model_diff, paths
from moetrain.errors import ConfigError

DIRECTORY = 'checkpoints'


def directory(workdir) -> epath.Path:
  return paths.resolve(workdir) / DIRECTORY


def manager(path, *, keep: int = 3, permanent_every: int = 0,
            read_only: bool = False) -> ocp.CheckpointManager:
  """An Orbax manager for `path` that keeps the `keep` latest steps and every multiple of
  `permanent_every` (0: none), saving asynchronously."""
  policies = [checkpoint_managers.LatestN(n=keep)]
  if permanent_every:
    policies.append(checkpoint_managers.EveryNSteps(interval_steps=permanent_every))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True, create=not read_only, read_only=read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'progress': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  with _quiet_read_only():
    return ocp.CheckpointManager(paths.absolute(path), options=options,
                                 item_handlers=handlers)


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_position: dict,
         config) -> None:
  """Starts an asynchronous save of `state` at `step` (returns once the arrays are copied).

  `data_position` is JSON: `{'data': …}`, the global position of `data.pipeline` (the same for
  any process count)."""
  checkpoints.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      progress=ocp.args.JsonSave({'step': step, **data_position}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def read_config(checkpoints: ocp.CheckpointManager, step: int) -> dict:
  """The config a checkpoint was written with, as a nested dict."""
  return checkpoints.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      'config']


def _key_name(key) -> str:
  return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))


def arrays(tree) -> dict:
  """`{'params/embed': leaf, ...}` of a state or its Orbax metadata (which stores named tuples
  as dicts, so paths go by names alone)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {'/'.join(map(_key_name, path)): leaf for path, leaf in leaves}


def _shapes(tree) -> dict:
  return {name: tuple(leaf.shape) for name, leaf in arrays(tree).items()}


def check_compatible(checkpoints: ocp.CheckpointManager, step: int, abstract_state,
                     config) -> None:
  """ConfigError naming the model fields that differ when the checkpoint's arrays do not fit
  `abstract_state`."""
  saved = _shapes(checkpoints.item_metadata(step)['state'])
  wanted = _shapes(abstract_state)
  if saved == wanted:
    return
  fields = model_diff.blocking_fields(read_config(checkpoints, step), config)
  mismatch = next((f'{name} is {saved.get(name)} there, {wanted.get(name)} here'
                   for name in sorted(set(saved) | set(wanted))
                   if saved.get(name) != wanted.get(name)))
  raise ConfigError(f'checkpoint {checkpoints.directory / str(step)} holds a different model'
                    f' ({", ".join(fields) if fields else mismatch}); use another --workdir')


def restore_latest(checkpoints: ocp.CheckpointManager, abstract_state, config, *, log=print):
  """(state, progress) from the newest readable checkpoint, restored with the shardings of
  `abstract_state` (a tree of jax.ShapeDtypeStruct); None when there is none.

  A checkpoint of another model raises ConfigError; an unreadable one is reported, renamed to
  `STEP.unreadable` (kept for inspection) and the previous one tried.
  """
  for step in sorted(checkpoints.all_steps(), reverse=True):
    path = checkpoints.directory / str(step)
    try:
      check_compatible(checkpoints, step, abstract_state, config)
      restored = checkpoints.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
    except ConfigError:
      raise
    except Exception as error:  # noqa: BLE001 - any failure to read means this one is bad
      reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
      log(f'moetrain: checkpoint {path} is unreadable ({type(error).__name__}: {reason}); '
          'trying the previous one')
      _set_aside(path)
      checkpoints.reload()
      continue
    return restored['state'], dict(restored['progress'])
  return None


def check_new_directory(path) -> epath.Path:
  """`path` as a Path; ConfigError naming it unless it is absent or an empty directory."""
  path = paths.resolve(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise ConfigError(f'{path} already exists and is not an empty directory; choose a new one')
  return path


def staging_for(path) -> epath.Path:
  """A new hidden sibling directory to build `path` in (`move_into_place` finishes it), so
  that `path` appears only once complete. ConfigError naming `path` if it cannot be made."""
  path = check_new_directory(path)
  staging = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.partial')
  try:
    staging.mkdir(parents=True)
  except OSError as error:
    raise ConfigError(f'{path}: cannot be created ({error.strerror or error})') from None
  return staging


def move_into_place(staging: epath.Path, path) -> None:
  path = paths.resolve(path)
  if path.exists():
    path.rmdir()
  staging.rename(path)


def save_model(workdir, params, buffers, config) -> None:
  """Writes weights alone (no optimizer state) as step 0 of a new `workdir`, atomically: the
  directory appears only once complete. What conversion and upcycling produce."""
  staging = staging_for(workdir)
  try:
    checkpoints = manager(directory(staging))
    checkpoints.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params, 'buffers': buffers}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
    checkpoints.wait_until_finished()
    checkpoints.close()
    (staging / 'config.json').write_text(config.to_json_best_effort(indent=2))
    move_into_place(staging, workdir)
  finally:
    if staging.exists():
      staging.rmtree()


def _latest(workdir) -> tuple[epath.Path, int]:
  """(checkpoints directory, newest step) of a workdir or of its `checkpoints` directory."""
  path = paths.resolve(workdir)
  path = path if (path / DIRECTORY).is_dir() or not path.name == DIRECTORY else path.parent
  if not (path / DIRECTORY).is_dir():
    raise ConfigError(f'{workdir}: no moetrain checkpoint there (expected {path / DIRECTORY})')
  steps = sorted(int(p.name) for p in (path / DIRECTORY).iterdir() if p.name.isdigit())
  if not steps:
    raise ConfigError(f'{workdir}: {path / DIRECTORY} holds no finished checkpoint')
  return path / DIRECTORY, steps[-1]


def model_config(workdir) -> ml_collections.ConfigDict:
  """The validated config of the newest checkpoint in `workdir` (fields it lacks: defaults)."""
  path, step = _latest(workdir)
  with _reader(path) as checkpoints:
    saved = read_config(checkpoints, step)
  config = config_lib.default_config()
  config_lib.update_from_dict(config, saved, str(path / str(step)))
  config_lib.validate(config)
  return config


def restore_weights(workdir, abstract_params, abstract_buffers, config=None):
  """(params, buffers) of the newest checkpoint in `workdir` (a run's or `save_model`'s),
  restored with the shardings of the abstract trees (jax.ShapeDtypeStructs). ConfigError for
  another model, naming the `model` fields that differ from `config` when given."""
  target = {'params': abstract_params, 'buffers': abstract_buffers}
  restored = next(_restore_parts(workdir, target, [target], config))
  return restored['params'], restored['buffers']


def weights_one_by_one(workdir, abstract_params, abstract_buffers):
  """Yields `(kind, path, array)` for every array of `restore_weights`, each restored alone,
  so that only one is held at a time (kind: params | buffers; path: '/'-joined keys)."""
  target = {'params': abstract_params, 'buffers': abstract_buffers}
  leaves = [(path, leaf) for path, leaf in arrays(target).items()]
  parts = [_tree_of(path, leaf) for path, leaf in leaves]
  for (path, _), restored in zip(leaves, _restore_parts(workdir, target, parts)):
    kind, rest = path.split('/', 1)
    node = restored[kind]
    for key in rest.split('/'):
      node = node[int(key) if key.isdigit() and int(key) in node else key]
    yield kind, rest, node


def _tree_of(path: str, leaf) -> dict:
  tree = leaf
  for key in reversed(path.split('/')):
    tree = {int(key) if key.isdigit() else key: tree}
  return tree


def _restore_parts(workdir, target, parts, config=None):
  """Checks `target` against the newest checkpoint's arrays, then restores each part."""
  path, step = _latest(workdir)
  with _reader(path) as checkpoints:
    saved = _shapes(checkpoints.item_metadata(step)['state'])
    wanted = _shapes(target)
    mismatch = [f'{name} is {saved.get(name)} there, {shape} here'
                for name, shape in wanted.items() if saved.get(name) != shape]
    if mismatch:
      fields = (model_diff.blocking_fields(read_config(checkpoints, step), config) if config
                else [])
      raise ConfigError(f'checkpoint {path / str(step)} holds a different model ('
                        + (", ".join(fields) if fields else mismatch[0]) + ')')
    for part in parts:
      yield checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          part, restore_args=ocp.checkpoint_utils.construct_restore_args(part),
          partial_restore=True)))['state']


def _reader(path: epath.Path) -> ocp.CheckpointManager:
  """A read-only manager whose `state` item may be restored in part (weights only)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with _quiet_read_only():
    return ocp.CheckpointManager(paths.absolute(path), options=options, item_handlers={
        'state': ocp.PyTreeCheckpointHandler(), 'progress': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler()})


class _ReadOnlyNotice(logging.Filter):
  """Drops the warning Orbax logs (through absl) whenever a read-only manager is opened:
  being read-only is what a reader is for."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


@contextlib.contextmanager
def _quiet_read_only():
  notice, absl_logger = _ReadOnlyNotice(), logging.getLogger('absl')
  absl_logger.addFilter(notice)
  try:
    yield
  finally:
    absl_logger.removeFilter(notice)


def _set_aside(path: epath.Path) -> None:
  if jax.process_index() == 0 and path.exists():
    path.rename(path.with_name(path.name + '.unreadable'))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'set aside {path.name}')


class PreemptionWatch:
  """Turns SIGTERM and SIGINT into a request to save and stop after the current step.

  With several processes, JAX's coordination service receives SIGTERM and every process sees
  the request at the same step (`reached_preemption`); SIGINT is then handled locally only.
  """

  def __init__(self, checkpoints: ocp.CheckpointManager | None):
    self.checkpoints = checkpoints
    self.requested = None
    self._previous = {}
    signals = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGINT, signal.SIGTERM]
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._request)

  def _request(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __call__(self, step: int) -> bool:
    """True once a stop is requested (the same step on every process for SIGTERM)."""
    if self.requested:
      return True
    if jax.process_count() > 1 and self.checkpoints is not None:
      if self.checkpoints.reached_preemption(step):
        self.requested = 'SIGTERM'
    return bool(self.requested)

  def close(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
