"""Checkpoints through the command line: kills, preemption, bad checkpoints, another model."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moetrain import checkpoint
from tests.devices import xla_flags

SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.log_every=1',
         '--config.train.eval_every=0', '--config.train.sample_tokens=0',
         '--config.train.checkpoint_every=2', '--config.train.warmup_steps=2']


def start(workdir, steps, *extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.Popen(
      [sys.executable, '-m', 'moetrain.train', '--config', 'configs/tiny.py', '--workdir',
       str(workdir), *SMALL, f'--config.train.steps={steps}', *extra],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
  stdout, stderr = process.communicate(timeout=600)
  return process.returncode, stdout, stderr


def train(workdir, steps, *extra):
  return finish(start(workdir, steps, *extra))


def logged_losses(workdir) -> dict[int, float]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  steps = [r['step'] for r in records]
  assert len(steps) == len(set(steps)), steps  # a resumed run rewrites, never duplicates
  return {r['step']: r['loss'] for r in records}


def wait_for_step(workdir, process, step):
  while max(logged_losses(workdir), default=0) < step:
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)


def wait_for_a_checkpoint(workdir, process):
  """Until one save has landed (Orbax renames a finished save to its bare step number)."""
  directory = pathlib.Path(checkpoint.directory(workdir))
  while not (directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())):
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)


def final_params(workdir, step):
  manager = checkpoint.manager(checkpoint.directory(workdir), read_only=True)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.device_get(restored['state']['params'])


def test_killed_three_times_the_run_equals_an_uninterrupted_one(tmp_path):
  steps = 12
  code, _, stderr = train(tmp_path / 'straight', steps)
  assert code == 0, stderr
  expected = logged_losses(tmp_path / 'straight')
  workdir = tmp_path / 'killed'
  kill_steps = sorted(np.random.default_rng().choice(np.arange(2, steps), 3, replace=False))
  for kill_step in kill_steps:
    process = start(workdir, steps)
    wait_for_step(workdir, process, kill_step)
    if kill_step == kill_steps[-1]:  # so the last run has a checkpoint to resume from
      wait_for_a_checkpoint(workdir, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
  code, _, stderr = train(workdir, steps)
  assert code == 0, stderr
  assert 'resuming from step' in stderr
  assert logged_losses(workdir) == expected, kill_steps  # bitwise: floats compared exactly
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, steps),
               final_params(tmp_path / 'straight', steps))


def test_sigterm_saves_the_step_reached_and_exits_zero(tmp_path):
  process = start(tmp_path, 10_000)
  wait_for_step(tmp_path, process, 3)
  process.send_signal(signal.SIGTERM)
  code, stdout, stderr = finish(process)
  assert code == 0, stderr
  reached = max(logged_losses(tmp_path))
  manager = checkpoint.manager(checkpoint.directory(tmp_path), read_only=True)
  assert manager.latest_step() == reached
  assert f'SIGTERM: saved step {reached}' in stdout
  code, _, stderr = train(tmp_path, reached + 2)
  assert code == 0, stderr
  assert f'resuming from step {reached}' in stderr
  assert sorted(logged_losses(tmp_path))[-3:] == [reached, reached + 1, reached + 2]


def garble(directory: pathlib.Path):
  """Overwrites the second half of every file of a checkpoint with junk."""
  for path in directory.rglob('*'):
    if path.is_file():
      data = path.read_bytes()
      path.write_bytes(data[:len(data) // 2] + b'\x13junk' * (len(data) // 10 + 1))


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory):
  """A workdir trained 4 steps, with checkpoints 2 and 4 (each test gets a copy)."""
  workdir = tmp_path_factory.mktemp('four_steps')
  code, _, stderr = train(workdir, 4)
  assert code == 0, stderr
  return workdir


@pytest.fixture
def workdir(four_steps, tmp_path):
  """A copy of `four_steps` for one test."""
  shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
  return tmp_path


def test_garbled_latest_checkpoint_is_named_set_aside_and_the_previous_one_used(workdir):
  checkpoints = checkpoint.directory(workdir)
  garble(pathlib.Path(checkpoints) / '4' / 'state')
  code, _, stderr = train(workdir, 6)
  assert code == 0, stderr
  assert f'checkpoint {checkpoints / "4"} is unreadable' in stderr
  assert 'resuming from step 2' in stderr
  assert (checkpoints / '4.unreadable').is_dir()  # kept for a post-mortem, not deleted
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_unfinished_checkpoint_is_ignored(workdir):
  checkpoints = checkpoint.directory(workdir)
  # What a save killed half-way leaves: a temporary directory Orbax never finalised.
  unfinished = checkpoints / '6.orbax-checkpoint-tmp-1234567890'
  unfinished.mkdir()
  (unfinished / 'state').mkdir()
  (unfinished / 'state' / 'partial').write_bytes(b'\0' * 10)
  code, _, stderr = train(workdir, 6)
  assert code == 0, stderr
  assert 'resuming from step 4' in stderr and 'unreadable' not in stderr


def snapshot(directory: pathlib.Path):
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob('*')}


def test_checkpoint_of_another_model_is_refused_and_nothing_is_written(workdir):
  before = snapshot(workdir)
  code, stdout, stderr = train(workdir, 4, '--config.model.d_model=48',
                               '--config.model.moe.num_experts=8')
  assert code == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('moetrain: error: checkpoint '), stderr
  assert 'model.d_model=32→48' in lines[0] and 'model.moe.num_experts=4→8' in lines[0]
  assert snapshot(workdir) == before


def test_inspect_tool_lists_step_config_and_every_array(four_steps):
  workdir = four_steps
  result = subprocess.run([sys.executable, 'tools/inspect_checkpoint.py', str(workdir)],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert f'checkpoint {checkpoint.directory(workdir) / "4"}: step 4' in out
  assert re.search(r'data position: \d+ documents begun by 8 lanes', out)
  assert 'model.d_model=32' in out and 'model.moe.num_experts=4' in out
  assert 'params/blocks/0/ffn/w_up' in out and '(4, 32, 64)' in out
  params = final_params(workdir, 4)
  count = sum(x.size for x in jax.tree.leaves(params))
  assert f'total params: {count:,} elements' in out
  missing = subprocess.run([sys.executable, 'tools/inspect_checkpoint.py', str(workdir / 'x')],
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and missing.stderr.strip().count('\n') == 0
  assert 'no such directory' in missing.stderr
