"""The `bam` mode of tools/benchmark.py: two dense branches of one seed model, trained on
different data, upcycled into one MoE with their attentions averaged (Branch-Train-MiX) or kept
as attention experts (BAM), each MoE then trained the same steps on the same data from the same
seed."""

import json
import pathlib
import subprocess
import sys
import tempfile
import time

from moetrain import config as config_lib
from moetrain.data import sources
from moetrain.data import tokenizer as tokenizer_lib
from moetrain.errors import ConfigError

# Each run's logged loss every step, no evaluation, samples or checkpoints in between.
QUIET = ['--config.train.log_every=1', '--config.train.eval_every=0',
         '--config.train.sample_tokens=0']
VARIANTS = {
    'averaged attention': ['--config.model.attention_experts=0'],
    'attention experts': ['--config.model.attention_experts=2'],
    'attention experts, shared K/V': ['--config.model.attention_experts=2',
                                      '--config.model.attention_experts_share_kv=True'],
}


def _train(config: str, workdir: pathlib.Path, steps: int, flags: list) -> dict:
  """Runs moetrain.train for `steps` steps (a checkpoint at the end); {step: training loss}."""
  result = subprocess.run(
      [sys.executable, '-m', 'moetrain.train', '--config', config, '--workdir', str(workdir),
       *QUIET, f'--config.train.steps={steps}', f'--config.train.checkpoint_every={steps}',
       *flags], capture_output=True, text=True, check=False)
  if result.returncode:
    raise ConfigError(f'{workdir.name}: moetrain.train failed: '
                      f'{(result.stderr.strip().splitlines() or ["?"])[-1]}')
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()
             if line]
  return {r['step']: r['loss'] for r in records if 'split' not in r}


def _domains() -> dict:
  """Two kinds of Python of the standard library, one per branch: its tests and its modules."""
  root = sources.stdlib_root()
  return {'tests': f'{root}/test/**/*.py', 'modules': f'{root}/*.py'}


def bam(args) -> None:
  """Branch-Train-MiX's recipe, as BAM upcycles: a seed dense model trained --seed-steps,
  branched into two copies trained --branch-steps more on different data (the standard
  library's tests; its modules), upcycled both ways and each MoE trained --steps on the whole
  corpus; prints each variant's first-step loss and the mean of its last 10 steps."""
  vocab = config_lib.load(args.dense_config, args.overrides).model.vocab_size
  tokenizer = f'--config.data.tokenizer={tokenizer_lib.stdlib_tokenizer_path(vocab)}'
  tokenizer_lib.load_or_train_stdlib_tokenizer(vocab)
  with tempfile.TemporaryDirectory() as scratch:
    seed = pathlib.Path(scratch) / 'seed'
    losses = _train(args.dense_config, seed, args.seed_steps, args.overrides)
    print(f'seed dense model: loss {losses[max(losses)]:.4f} after {args.seed_steps} steps',
          flush=True)
    branches = []
    for name, files in _domains().items():
      workdir = pathlib.Path(scratch) / name
      losses = _train(args.dense_config, workdir, args.branch_steps,
                      [*args.overrides, f'--config.init.from_checkpoint={seed}',
                       '--config.data.source=text', f'--config.data.path={files}', tokenizer])
      print(f'branch on the stdlib {name}: loss {losses[max(losses)]:.4f} after '
            f'{args.branch_steps} more steps', flush=True)
      branches.append(str(workdir))
    print(f'| upcycled from 2 branches | step 1 loss | mean loss, steps '
          f'{args.steps - 9}–{args.steps} |')
    print('| --- | --- | --- |')
    for name, flags in VARIANTS.items():
      start = time.perf_counter()
      workdir = pathlib.Path(scratch) / name.replace(' ', '_').replace(',', '').replace('/', '')
      losses = _train(args.config, workdir, args.steps,
                      [*args.overrides, *flags,
                       f'--config.init.upcycle_from={",".join(branches)}'])
      last = [losses[step] for step in sorted(losses)[-10:]]
      print(f'| {name} | {losses[min(losses)]:.4f} | {sum(last) / len(last):.4f} |'
            f' ({time.perf_counter() - start:.0f} s)', flush=True)


def add_parser(commands) -> None:
  """Adds the `bam` subcommand to benchmark.py's parser."""
  run = commands.add_parser('bam', help='upcycling two dense models: averaged attention vs '
                            'attention experts (BAM), trained alike')
  run.add_argument('--dense-config', default='configs/tiny_dense.py')
  run.add_argument('--config', default='configs/tiny.py')
  run.add_argument('--seed-steps', type=int, default=100)
  run.add_argument('--branch-steps', type=int, default=100)
  run.add_argument('--steps', type=int, default=50)
  run.add_argument('overrides', nargs='*', help='--config.section.key=value overrides of '
                   'every run')
  run.set_defaults(run=bam)
