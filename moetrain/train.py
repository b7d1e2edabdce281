"""Command line: `python -m moetrain.train --config configs/tiny.py --workdir DIR [--config.a.b=v]`.

Bad input (config file, override, workdir, a layout the devices cannot hold) prints one line
naming the problem and exits with status 2 before any data or device state is touched.
"""

import argparse
import os
import pathlib
import sys
import uuid

from moetrain import config as config_lib
from moetrain.config import ConfigError

SAMPLE_PROMPT = 'import os\n\n\ndef '


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ConfigError(message)


def parse_args(argv):
  """Splits argv into (--config path, --workdir, ['--config.a.b=v', ...])."""
  parser = _Parser(prog='python -m moetrain.train', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='a configs/*.py file with get_config()')
  parser.add_argument('--workdir', required=True, help='metrics, logs and checkpoints go here')
  args, rest = parser.parse_known_args(argv)
  for flag in rest:
    if not flag.startswith('--config.'):
      raise ConfigError(f'unknown flag {flag.split("=")[0]} (overrides are --config.<field>=<v>)')
  return args.config, args.workdir, rest


def prepare_workdir(path: str) -> pathlib.Path:
  """Creates the workdir if needed and proves it writable; ConfigError naming it otherwise."""
  workdir = pathlib.Path(path)
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


def load_data(config, process_index: int, process_count: int):
  """The tokenizer, the training batch iterator and the fixed eval batches of this process."""
  from moetrain.data import pipeline, tokenizer as tokenizer_lib
  if config.data.tokenizer:
    try:
      tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
    except (OSError, RuntimeError, ValueError) as error:
      raise ConfigError(f'data.tokenizer={config.data.tokenizer!r}: {error}') from error
  else:
    tokenizer = tokenizer_lib.load_or_train_stdlib_tokenizer(config.model.vocab_size)
  if tokenizer.vocab_size() > config.model.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({tokenizer.vocab_size()})')
  t = config.train
  train_rows = pipeline.pack(pipeline.tokenized_stdlib('train', tokenizer), t.seq_len)
  eval_rows = pipeline.pack(pipeline.tokenized_stdlib('eval', tokenizer), t.seq_len)
  train_iter = pipeline.train_batches(train_rows, t.batch_size, t.seed, process_index,
                                      process_count)
  eval_batches = pipeline.eval_batches(eval_rows, t.batch_size, t.eval_batches, process_index,
                                       process_count) if t.eval_every else []
  return tokenizer, train_iter, eval_batches


def run(config, workdir_path: str) -> dict:
  """Trains `config` in `workdir_path`; returns the run summary."""
  import jax
  import tqdm

  from moetrain import generate, metrics, trainer
  from moetrain.parallel.mesh import make_mesh

  mesh = make_mesh(config)
  workdir = prepare_workdir(workdir_path)
  enable_compilation_cache()
  lead = jax.process_index() == 0
  tokenizer, train_iter, eval_batches = load_data(config, jax.process_index(),
                                                  jax.process_count())
  if lead:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  setup = trainer.make_setup(config, mesh)
  writer = metrics.MetricsWriter(workdir, enabled=lead)
  with jax.set_mesh(mesh):
    state = trainer.init_state(setup)
    with tqdm.tqdm(total=config.train.steps, desc='train', unit='step', disable=not lead,
                   dynamic_ncols=True) as progress:
      state, summary = trainer.train_loop(setup, state, train_iter, eval_batches, writer,
                                          progress)
  writer.close()
  if lead:
    print(f'loss {summary["first_loss"]:.3f} → {summary["loss"]:.3f}'
          + (f', eval loss {summary["eval_loss"]:.3f}' if summary['eval_loss'] else '')
          + (f', {summary["tokens_per_sec"]:,.0f} tokens/s' if summary.get('tokens_per_sec')
             else ''))
    print(f'metrics: {workdir / "metrics.jsonl"}; TensorBoard: tensorboard --logdir {workdir}')
  if config.train.sample_tokens and lead:
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    new = generate.generate(setup.graphdef, state['params'], state['buffers'], prompt,
                            min(config.train.sample_tokens,
                                config.model.max_seq_len - len(prompt)),
                            temperature=0.7, seed=config.train.seed)
    print('--- sample ---\n' + tokenizer.decode(prompt + new) + '\n--------------')
  return summary


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    config_path, workdir, overrides = parse_args(argv)
    config = config_lib.load(config_path, overrides)
    run(config, workdir)
  except ConfigError as error:
    print(f'moetrain: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
