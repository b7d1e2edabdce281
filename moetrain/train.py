"""Command line: `python -m moetrain.train --config configs/tiny.py --workdir DIR [--config.a.b=v]`.

Bad input (config file, override, workdir, a layout the devices cannot hold) prints one line
naming the problem and exits with status 2 before any data or device state is touched.

Multi-process runs join with `jax.distributed.initialize` before any device is touched: either
explicitly (`--coordinator_address HOST:PORT --num_processes N --process_id I`, as
`launch/local_multiprocess.sh` passes them) or, with `MOETRAIN_DISTRIBUTED=auto` in the
environment (as `launch/tpu_pod.sh` and `launch/gpu_slurm.sh` set it), from what JAX detects
on a TPU pod or in a SLURM job. Single-process runs initialise nothing.
"""

import contextlib
import os
import sys
import uuid

from moetrain import config as config_lib
from moetrain import interrupts, liveness, paths, watchdog
from moetrain.errors import ConfigError

SAMPLE_PROMPT = 'import os\n\n\ndef '


DISTRIBUTED_ENV = 'MOETRAIN_DISTRIBUTED'
_DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def _parser():
  parser = config_lib.ArgumentParser(prog='python -m moetrain.train', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='a configs/*.py file with get_config()')
  parser.add_argument('--workdir', required=True, help='metrics, logs and checkpoints go here')
  group = parser.add_argument_group('multi-process (all three together, or none)')
  group.add_argument('--coordinator_address', help='HOST:PORT of process 0\'s coordinator')
  group.add_argument('--num_processes', type=int, help='how many processes join the run')
  group.add_argument('--process_id', type=int, help='this process, 0 … num_processes-1')
  return parser


def parse_command_line(argv, environ=None):
  """(--config path, --workdir, overrides, jax.distributed.initialize kwargs or None)."""
  args, rest = config_lib.parse_with_overrides(_parser(), argv)
  distributed = distributed_options(args, os.environ if environ is None else environ)
  return args.config, args.workdir, rest, distributed


def distributed_options(args, environ) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

  Explicit flags win; otherwise `MOETRAIN_DISTRIBUTED=auto` initialises with no arguments
  (JAX detects TPU pods, SLURM, Open MPI); unset, empty or `0`/`off` means one process.
  """
  given = {name: getattr(args, name) for name in _DISTRIBUTED_FLAGS}
  if any(value is not None for value in given.values()):
    missing = [f'--{name}' for name, value in given.items() if value is None]
    if missing:
      raise ConfigError(f'{" and ".join(missing)} missing: --coordinator_address, '
                        '--num_processes and --process_id go together')
    address, num, index = (given[name] for name in _DISTRIBUTED_FLAGS)
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f'--coordinator_address {address}: expected HOST:PORT')
    if num < 1:
      raise ConfigError(f'--num_processes {num}: must be at least 1')
    if not 0 <= index < num:
      raise ConfigError(f'--process_id {index}: must be between 0 and --num_processes-1 '
                        f'({num - 1})')
    return {'coordinator_address': address, 'num_processes': num, 'process_id': index}
  mode = environ.get(DISTRIBUTED_ENV, '').strip().lower()
  if mode == 'auto':
    return {}
  if mode not in ('', '0', 'off'):
    raise ConfigError(f'{DISTRIBUTED_ENV}={environ[DISTRIBUTED_ENV]}: expected auto, off or '
                      'unset')
  return None


def initialize_distributed(options: dict | None, heartbeat_timeout_s: float) -> None:
  """Joins the multi-process run (before anything touches devices); nothing for one process.
  JAX's own heartbeat check is set well behind `liveness.PeerWatch`'s."""
  if options is None:
    return
  import jax
  try:
    jax.distributed.initialize(
        **options, heartbeat_timeout_seconds=liveness.jax_heartbeat_s(heartbeat_timeout_s))
  except ValueError as error:  # e.g. `auto` outside a cluster JAX can detect
    how = f'{DISTRIBUTED_ENV}=auto' if not options else '--coordinator_address'
    raise ConfigError(f'{how}: jax.distributed.initialize failed: '
                      f'{str(error).splitlines()[0] if str(error) else error!r}') from error


def prepare_workdir(path: str):
  """The workdir (local or a `gs://` URL) as an epath.Path, created if needed and proven
  writable; ConfigError naming it otherwise."""
  workdir = paths.check_reachable(path, '--workdir')
  probe = workdir / f'.write-test-{uuid.uuid4().hex}'
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as error:
    raise ConfigError(f'--workdir {path}: not writable ({error.strerror or error})') from error
  return workdir


def enable_compilation_cache():
  """JAX's persistent compilation cache, beside the tokenizer cache, so reruns start fast."""
  import jax
  from moetrain.data.tokenizer import cache_dir
  jax.config.update('jax_compilation_cache_dir', str(cache_dir() / 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def silence_stdout() -> None:
  """Sends this process's standard output, C++ libraries' included, to /dev/null: in a
  multi-process run only the lead process reports (the others would repeat its lines and add
  the collectives library's connection notices); errors still reach standard error."""
  sys.stdout.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.close(devnull)


def open_checkpoints(workdir, train_config):
  """The run's checkpoint manager, with `train_config`'s retention."""
  from moetrain import checkpoint
  return checkpoint.manager(checkpoint.directory(workdir), keep=train_config.keep_checkpoints,
                            permanent_every=train_config.permanent_every)


def restore_or_init(setup, workdir, lead: bool):
  """(state, data position, checkpoint manager): the newest readable checkpoint in `workdir`,
  or a fresh state (position None). Raises ConfigError for a checkpoint of another model before
  anything is written."""
  from moetrain import checkpoint
  from moetrain.state import abstract_state, init_state
  t = setup.config.train
  path = checkpoint.directory(workdir)
  # A fresh workdir gets its checkpoints directory only once training starts writing.
  checkpoints = open_checkpoints(workdir, t) if path.exists() else None
  restored = None
  log = (lambda line: print(line, file=sys.stderr)) if lead else (lambda line: None)
  if checkpoints is not None:
    restored = checkpoint.restore_latest(checkpoints, abstract_state(setup),
                                         setup.config, log=log)
  if restored is None:
    from moetrain import warm_start
    weights = warm_start.initial_weights(setup, log=log)
    if lead and weights is not None:
      i = setup.config.init
      source = (f'weights of {i.from_checkpoint}' if i.from_checkpoint else
                f'{i.upcycle_from} upcycled ({i.upcycle})')
      print(f'starting from {source}', file=sys.stderr)
    return init_state(setup, weights), None, checkpoints
  state, progress = restored
  if lead:
    print(f'resuming from step {int(state["step"])} of {path}', file=sys.stderr)
  return state, progress, checkpoints


def run(config, workdir_path: str, guard=None) -> dict:
  """Trains `config` in `workdir_path`, resuming from its newest checkpoint; returns the run
  summary. `guard`: the interrupts.StartupGuard to disarm while the loop runs (its own
  handler saves on SIGINT and SIGTERM)."""
  import jax
  import tqdm

  from moetrain import checkpoint, exchange_model, generate, metrics, summary, trainer
  from moetrain.data.inputs import data_position, load_data
  from moetrain.parallel import sharding
  from moetrain.parallel.mesh import make_mesh
  from moetrain.state import abstract_state, make_setup

  mesh = make_mesh(config)
  exchange_model.resolve_exchange_chunks(config, mesh)
  workdir = prepare_workdir(workdir_path)
  enable_compilation_cache()
  lead = jax.process_index() == 0
  if not lead:
    silence_stdout()
  setup = make_setup(config, mesh)
  t = config.train
  if lead:
    print('\n'.join(summary.describe(setup, abstract_state(setup))))
  with jax.set_mesh(mesh):
    state, position, checkpoints = restore_or_init(setup, workdir, lead)
    start_step = int(state['step'])
    tokenizer, train_iter, eval_batches, data_lines = load_data(
        config, sharding.process_rows(setup.batch_sharding, t.batch_size), position)
    if lead:
      print('\n'.join(data_lines))
      paths.write_text(workdir / 'config.json', config.to_json_best_effort(indent=2))
    if checkpoints is None:
      checkpoints = open_checkpoints(workdir, t)
    writer = metrics.MetricsWriter(workdir, enabled=lead, resumed_at=start_step)
    save = lambda step, state: checkpoint.save(checkpoints, step, state,
                                               data_position(train_iter), config)
    if guard is not None:
      guard.disarm()
    watch = checkpoint.PreemptionWatch(checkpoints)
    hang = watchdog.StepWatchdog(watchdog.timeout_from(t.step_timeout_s), workdir,
                                 checkpoints.latest_step)
    peers = liveness.PeerWatch(jax.process_index(), jax.process_count(), t.heartbeat_timeout_s,
                               checkpoints.latest_step)
    # The peer watch spans the closing waits too: the checkpoint's commit barrier blocks on a
    # lost peer as a collective does.
    with peers:
      try:
        # Only the lead process draws the bar and prints eval lines.
        with (tqdm.tqdm(total=t.steps, initial=start_step, desc='train', unit='step',
                        dynamic_ncols=True) if lead else contextlib.nullcontext()) as progress, \
            hang:
          state, summary = trainer.train_loop(setup, state, train_iter, eval_batches, writer,
                                              progress, save=save, stop_requested=watch,
                                              trace_dir=workdir, finished=hang.beat)
      finally:
        train_iter.close()
        watch.close()
        checkpoints.wait_until_finished()
        checkpoints.close()
        writer.close()
        if guard is not None:
          guard.arm(guard.AFTER)
  if lead and summary['stopped_at'] is not None:
    print(f'{watch.requested}: saved step {summary["stopped_at"]} in '
          f'{checkpoint.directory(workdir)}; run the same command again to resume')
  elif lead and summary['loss'] is not None:
    first = (f'{summary["first_loss"]:.3f} (step {summary["first_logged_step"]}) → '
             if summary['first_logged_step'] != summary['logged_step'] else '')
    print(f'loss {first}{summary["loss"]:.3f} (step {summary["logged_step"]})'
          + (f', eval loss {summary["eval_loss"]:.3f}' if summary['eval_loss'] else '')
          + (f', {summary["tokens_per_sec"]:,.0f} tokens/s' if summary.get('tokens_per_sec')
             else ''))
    print(f'metrics: {workdir / "metrics.jsonl"}; TensorBoard (pip install -e '
          f"'.[tensorboard]'): tensorboard --logdir {workdir}")
  if config.train.sample_tokens and lead and summary['stopped_at'] is None:
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    new = generate.generate(generate.decoding_graphdef(config.model), state['params'],
                            state['buffers'], prompt,
                            min(config.train.sample_tokens,
                                config.model.max_seq_len - len(prompt)),
                            temperature=0.7, seed=config.train.seed)
    print('--- sample ---\n' + tokenizer.decode(prompt + new) + '\n--------------')
  return summary


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    with interrupts.StartupGuard() as guard:
      config_path, workdir, overrides, distributed = parse_command_line(argv)
      config = config_lib.load(config_path, overrides)
      initialize_distributed(distributed, config.train.heartbeat_timeout_s)
      run(config, workdir, guard)
  except ConfigError as error:
    print(f'moetrain: error: {error}', file=sys.stderr)
    return 2
  except RuntimeError as error:
    from moetrain.trainer import NonFiniteError
    if not isinstance(error, NonFiniteError):
      raise
    print(f'moetrain: error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
