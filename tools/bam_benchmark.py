"""The `bam` mode of tools/benchmark.py: two dense models trained apart, upcycled into one MoE
with their attentions averaged (Branch-Train-MiX) or kept as attention experts (BAM), each
MoE then trained the same steps on the same data from the same seed."""

import json
import pathlib
import subprocess
import sys
import tempfile
import time

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


def bam(args) -> None:
  """Trains dense models A and B (seeds 1 and 2) for --dense-steps, then each upcycled MoE
  for --steps; prints each variant's first-step loss and the mean of its last 10 steps."""
  with tempfile.TemporaryDirectory() as scratch:
    dense = []
    for seed in (1, 2):
      workdir = pathlib.Path(scratch) / f'dense{seed}'
      losses = _train(args.dense_config, workdir, args.dense_steps,
                      [*args.overrides, f'--config.train.seed={seed}'])
      print(f'dense seed {seed}: loss {losses[max(losses)]:.4f} after {args.dense_steps} steps',
            flush=True)
      dense.append(str(workdir))
    print(f'| upcycled from 2 dense models | step 1 loss | mean loss, steps '
          f'{args.steps - 9}–{args.steps} |')
    print('| --- | --- | --- |')
    for name, flags in VARIANTS.items():
      start = time.perf_counter()
      workdir = pathlib.Path(scratch) / name.replace(' ', '_').replace(',', '').replace('/', '')
      losses = _train(args.config, workdir, args.steps,
                      [*args.overrides, *flags, f'--config.init.upcycle_from={",".join(dense)}',
                       '--config.train.seed=0'])
      last = [losses[step] for step in sorted(losses)[-10:]]
      print(f'| {name} | {losses[min(losses)]:.4f} | {sum(last) / len(last):.4f} |'
            f' ({time.perf_counter() - start:.0f} s)', flush=True)


def add_parser(commands) -> None:
  """Adds the `bam` subcommand to benchmark.py's parser."""
  run = commands.add_parser('bam', help='upcycling two dense models: averaged attention vs '
                            'attention experts (BAM), trained alike')
  run.add_argument('--dense-config', default='configs/tiny_dense.py')
  run.add_argument('--config', default='configs/tiny.py')
  run.add_argument('--dense-steps', type=int, default=100)
  run.add_argument('--steps', type=int, default=50)
  run.add_argument('overrides', nargs='*', help='--config.section.key=value overrides of '
                   'every run')
  run.set_defaults(run=bam)
