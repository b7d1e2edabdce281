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


@pytest.fixture(scope='module')
def model_mode(tmp_path_factory):
  """(stdout, JSON report) of the model mode for 4 expert ranks of a tiny model."""
  out = tmp_path_factory.mktemp('model') / 'model.json'
  result = benchmark('model', '--config', 'configs/tiny.py', '--mesh', 'data=1,expert=4',
                     '--json', str(out), *TINY)
  assert result.returncode == 0, result.stderr
  return result, json.loads(out.read_text())


def test_model_mode_compiles_for_a_mesh_of_stand_in_devices(model_mode):
  """The tool restarts itself with the CPU devices the mesh needs."""
  result, report = model_mode
  assert report['devices'] == 4 and report['mesh']['expert'] == 4
  assert report['flops'] * 4 == pytest.approx(report['hand_flops']['hardware'], rel=0.1)
  assert report['collective_groups']['all-to-all'] == 4
  assert [row['chip'] for row in report['roofline']] == ['NVIDIA H100 SXM5 80GB',
                                                         'Google TPU v5p']
  assert all(0 < row['mfu'] < 1 for row in report['roofline'])
  assert 'all-to-all' in result.stdout and 'TPU v5p' in result.stdout


def test_model_mode_reports_links_and_each_way_to_run_the_exchange(model_mode):
  """Bytes per link class and exposed communication, flat and each variant, per chip."""
  result, report = model_mode
  for row in report['roofline']:
    assert row['exposed_comm_s'] == pytest.approx(
        row['exchange']['exposed_s'] + sum(s for role, s in row['collective_s'].items()
                                           if role != 'exchange'))
    assert row['link_bytes']['inter'] == 0  # 4 devices: one node, one slice
  for chip, links in (('h100', ('NVLink GiB', 'InfiniBand GiB')), ('tpu-v5p', ('ICI GiB',
                                                                               'DCN GiB'))):
    variants = report['exchange_variants'][chip]
    assert [v['variant'] for v in variants] == ['flat', 'overlapped', 'two-level', 'fp8',
                                                'combined', 'block', 'combined, block']
    flat, overlapped, two_level, fp8, combined, block, _ = variants
    assert flat['chunks'] == 1 and overlapped['chunks'] in (1, 2)  # 2 sequences per device
    assert overlapped['exposed_s'] <= flat['exposed_s']
    assert two_level == {**flat, 'variant': 'two-level'}  # nothing leaves the node
    # tiny.py's activations are float32: FP8 sends about a quarter of the forward dispatch.
    assert fp8['bytes']['intra'] < flat['bytes']['intra'] * 0.85
    assert combined['exposed_comm_s'] < flat['exposed_comm_s']
    assert block['exposed_s'] <= overlapped['exposed_s']  # attention hides the exchange too
    assert all(header in result.stdout for header in links)
  assert 'exposed s' in result.stdout and 'the expert exchange spans 1 node(s)' in result.stdout
  assert all(f'  {name} ' in result.stdout for name in ('flat', 'overlapped', 'two-level', 'fp8',
                                                        'combined', 'block', 'combined, block'))


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
