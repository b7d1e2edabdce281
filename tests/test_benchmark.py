"""tools/benchmark.py's `train` and `model` modes from the command line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config.train.batch_size=8', '--config.train.seq_len=32',
        '--config.model.num_layers=2']


def benchmark(*args, cwd=ROOT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), *args],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_train_mode_reports_compile_step_and_tokens_per_second(tmp_path):
  out = tmp_path / 'train.json'
  result = benchmark('train', '--config', 'configs/tiny.py', '--repeats', '2', '--json',
                     str(out), *TINY)
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report['compile_s'] > 0 and report['step_s'] > 0
  assert report['tokens_per_s'] == pytest.approx(8 * 32 / report['step_s'])
  assert report['mfu'] is None and 'MFU              n/a' in result.stdout  # CPU: no peak


def test_model_mode_compiles_for_a_mesh_of_stand_in_devices(tmp_path):
  """The tool restarts itself with the CPU devices the mesh needs."""
  out = tmp_path / 'model.json'
  result = benchmark('model', '--config', 'configs/tiny.py', '--mesh', 'data=1,expert=4',
                     '--json', str(out), *TINY)
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report['devices'] == 4 and report['mesh']['expert'] == 4
  assert report['flops'] * 4 == pytest.approx(report['hand_flops']['hardware'], rel=0.1)
  assert report['collective_groups']['all-to-all'] == 4
  assert [row['chip'] for row in report['roofline']] == ['NVIDIA H100 SXM5 80GB',
                                                         'Google TPU v5p']
  assert all(0 < row['mfu'] < 1 for row in report['roofline'])
  assert 'all-to-all' in result.stdout and 'TPU v5p' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['model', '--config', 'configs/tiny.py', '--mesh', 'pipeline=2'], "unknown axis 'pipeline'"),
    (['model', '--config', 'configs/tiny.py', '--mesh', 'expert=two'], 'expert=two must be'),
    (['model', '--config', 'configs/tiny.py'], '--devices is needed'),
    (['model', '--config', 'configs/missing.py', '--devices', '1'], 'configs/missing.py'),
    (['train', '--config', 'configs/tiny.py', '--config.model.moe.top_k=0'], 'model.moe.top_k'),
    (['train', '--steps', '3'], 'unknown flag --steps'),
    (['moe-layer', '--config.model.d_model=8'], 'moe-layer takes no config overrides'),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, tmp_path):
  result = benchmark(*args, cwd=ROOT)
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1 and message in result.stderr, result.stderr
