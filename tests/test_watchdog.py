"""A hung step is caught: the run ends within train.step_timeout_s (plus a poll) with every
thread's stack in the workdir, one line naming the step and the last saved one, and status 1."""

import os
import subprocess
import sys
import time

import pytest

from moetrain import config as config_lib, watchdog
from moetrain.errors import ConfigError
from tests.test_train import SMALL
from tests.devices import xla_flags


def test_auto_timeout_is_ten_median_steps_and_never_below_the_floor():
  dog = watchdog.StepWatchdog(None, '.', lambda: None)
  assert dog.timeout_s() is None  # nothing measured: the first step compiles
  dog.beat(1)
  assert dog.timeout_s() is None
  dog.durations = [40.0, 50.0, 60.0]
  assert dog.timeout_s() == 500.0
  dog.durations = [1.0, 2.0]
  assert dog.timeout_s() == watchdog.AUTO_FLOOR_S
  fixed = watchdog.StepWatchdog(5.0, '.', lambda: None)
  assert fixed.timeout_s() is None  # not before the first step has finished
  fixed.beat(1)
  assert fixed.timeout_s() == 5.0


@pytest.mark.parametrize('value', ['0', '-3', 'soon'])
def test_a_timeout_that_is_not_positive_names_the_field(value):
  with pytest.raises(ConfigError, match=f"train.step_timeout_s='{value}' must be auto or a "
                                        'number of seconds > 0'):
    config_lib.load('configs/tiny.py', [f'--config.train.step_timeout_s={value}'])


def test_a_hung_step_ends_the_run_with_the_stacks_in_the_workdir(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL='2', **{watchdog.HANG_ENV: '4'})
  process = subprocess.Popen(
      [sys.executable, '-m', 'moetrain.train', '--config', 'configs/tiny.py', '--workdir',
       str(workdir), *SMALL, '--config.train.steps=6', '--config.train.checkpoint_every=2',
       '--config.train.step_timeout_s=5', '--config.train.sample_tokens=0'],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line.strip())
    if 'fault injection: step 4 hangs' in line:
      hung_at = time.monotonic()
      break
  else:
    pytest.fail('\n'.join(lines))
  status = process.wait(timeout=60)
  ended_after = time.monotonic() - hung_at
  rest = process.stderr.read().strip().splitlines()
  assert status == 1 and ended_after < 5 + 30, (status, ended_after, rest)
  assert len(rest) == 1 and rest[0].startswith('moetrain: error: step 4 has not finished 5 s '
                                               'after step 3 (train.step_timeout_s)'), rest
  assert rest[0].endswith('the last saved step is 2')
  dump, = workdir.glob('stacks-step4-*.txt')
  assert 'injected_hang' in dump.read_text()  # the main thread's stack, where it hangs
