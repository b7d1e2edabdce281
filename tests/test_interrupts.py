"""Ctrl-C and SIGTERM during start-up stop a run at once with one line; a run started in the
background with SIGINT ignored (as shells start jobs) stops too; training imports no torch."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.devices import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.eval_every=0',
         '--config.train.sample_tokens=0', '--config.train.checkpoint_every=1']


def start(workdir, cache, *, sigint_ignored: bool):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL='2', MOETRAIN_CACHE=str(cache))
  # A cold cache: the run spends its first tens of seconds training its tokenizer in C++.
  command = [sys.executable, '-m', 'moetrain.train', '--config', str(REPO / 'configs/tiny.py'),
             '--workdir', str(workdir), *SMALL, '--config.train.steps=5']
  if sigint_ignored:  # as a non-interactive shell starts `command &`; exec keeps the pid
    command = ['sh', '-c', 'trap "" INT; exec "$@"', 'sh', *command]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize('sigint_ignored', [False, True], ids=['foreground', 'background'])
@pytest.mark.parametrize('after_s', [1, 5])
def test_sigint_during_start_up_stops_at_once_with_one_line(tmp_path, after_s, sigint_ignored):
  process = start(tmp_path / 'run', tmp_path / 'cache', sigint_ignored=sigint_ignored)
  time.sleep(after_s)
  assert process.poll() is None, process.communicate()
  sent = time.monotonic()
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert time.monotonic() - sent < 10
  assert process.returncode == 128 + signal.SIGINT
  assert 'Traceback' not in stderr, stderr
  stops = [line for line in stderr.splitlines() if 'SIGINT' in line]
  assert stops == ['moetrain: SIGINT before training started: stopped, no step run and no '
                   'checkpoint written'], stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_sigterm_during_start_up_stops_the_same_way(tmp_path):
  process = start(tmp_path / 'run', tmp_path / 'cache', sigint_ignored=True)
  time.sleep(2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGTERM
  assert stderr.splitlines()[-1].startswith('moetrain: SIGTERM before training started'), stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_training_run_does_not_import_torch(tmp_path):
  argv = ['--config', 'configs/tiny.py', '--workdir', str(tmp_path), *SMALL,
          '--config.train.steps=1']
  script = ('import sys\nfrom moetrain import train\n'
            f'code = train.main({argv!r})\n'
            'print("exit", code, "torch imported:", "torch" in sys.modules)\n')
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert 'exit 0 torch imported: False' in result.stdout, result.stderr


def test_other_signals_with_handlers_do_not_stop_start_up():
  script = ('import os, signal, time\nfrom moetrain import interrupts\n'
            'with interrupts.StartupGuard():\n'
            '  signal.signal(signal.SIGUSR1, lambda *_: print("handled"))\n'
            '  os.kill(os.getpid(), signal.SIGUSR1)\n'
            '  time.sleep(0.5)\n'
            '  print("still running")\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['handled', 'still', 'running']
