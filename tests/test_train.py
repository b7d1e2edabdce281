"""The command line: a short end-to-end run, and one clear line for every kind of bad input."""

import json
import os
import subprocess
import sys

import pytest

from moetrain import train
from moetrain.data import sources
from tests.devices import xla_flags

SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.steps=4', '--config.train.log_every=2',
         '--config.train.eval_every=2', '--config.train.eval_batches=1',
         '--config.train.sample_tokens=4']


def run_cli(*args, devices=1):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'moetrain.train', *args], env=env,
                        capture_output=True, text=True, timeout=600)


def test_short_run_writes_metrics_and_tensorboard(tmp_path):
  workdir = tmp_path / 'run'
  result = run_cli('--config', 'configs/tiny.py', '--workdir', str(workdir), *SMALL,
                   '--config.train.profile_steps=1')
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'split' not in r]
  evals = [r for r in records if r.get('split') == 'eval']
  assert [r['step'] for r in train] == [2, 4] and [r['step'] for r in evals] == [2, 4]
  for key in ('loss', 'aux_loss', 'z_loss', 'learning_rate', 'tokens_per_sec',
              'expert_fraction', 'dropped_fraction', 'max_load', 'router_entropy',
              'experts_per_token', 'router_bias', 'aux_loss_per_layer', 'z_loss_per_layer'):
    assert key in train[-1], key
  assert len(train[-1]['expert_fraction']) == 2 and len(train[-1]['expert_fraction'][0]) == 4
  assert abs(sum(train[-1]['expert_fraction'][0]) - 1.0) < 1e-5
  assert len(train[-1]['max_load']) == 2 and min(train[-1]['max_load']) >= 1.0
  assert any(p.name.startswith('events.out.tfevents') for p in workdir.iterdir())
  assert '--- sample ---' in result.stdout
  assert 'active per token' in result.stdout  # the startup summary
  counts = [len(sources.stdlib_files(split)) for split in ('train', 'eval')]
  assert (f"data: the Python standard library's .py files (the embedded corpus): "
          f'{counts[0]:,} train documents, {counts[1]:,} eval documents') in result.stdout
  assert 'tokenizer: sentencepiece, 8,000 pieces (trained on the train split' in result.stdout
  # The final line's losses are those of logged steps, as metrics.jsonl holds them.
  assert (f'loss {train[0]["loss"]:.3f} (step 2) → {train[-1]["loss"]:.3f} (step 4)'
          in result.stdout)
  assert "TensorBoard (pip install -e '.[tensorboard]')" in result.stdout
  # Step 2 was traced for TensorBoard's profile plugin.
  assert list((workdir / 'plugins' / 'profile').glob('*/*.xplane.pb'))


def expect_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('moetrain: error: ')
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_missing_config_file(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/nope.py', '--workdir', str(tmp_path)),
                        "file 'configs/nope.py' not found")


def test_config_file_without_get_config(tmp_path):
  path = tmp_path / 'empty.py'
  path.write_text('VALUE = 1\n')
  expect_one_line_error(run_cli('--config', str(path), '--workdir', str(tmp_path / 'w')),
                        'does not define get_config()')


def test_unknown_override_key(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                                '--config.model.moe.topk=2'),
                        '--config.model.moe.topk: unknown field')


def test_unknown_flag(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                                '--steps=3'), 'unknown flag --steps')


def test_wrong_typed_value(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                                '--config.train.steps=many'),
                        '--config.train.steps=many: expected int')


def test_top_k_above_num_experts(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                                '--config.model.moe.top_k=9'),
                        'model.moe.top_k=9', 'model.moe.num_experts=8')


def test_batch_not_divisible_over_the_mesh(tmp_path):
  workdir = tmp_path / 'w'
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(workdir),
                                '--config.train.batch_size=12', devices=8),
                        'train.batch_size=12', 'data×fsdp×expert=8')
  assert not workdir.exists()


def test_mesh_not_matching_devices(tmp_path):
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'w'),
                                '--config.mesh.data=4', devices=8),
                        'needs 4 devices, but 8 are available')


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir',
                                str(blocker / 'run')), f'--workdir {blocker / "run"}: not writable')
  assert blocker.read_text() == 'not a directory'


def test_negative_capacity_factor(tmp_path):
  workdir = tmp_path / 'w'
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(workdir),
                                '--config.model.moe.capacity_factor=-1'),
                        'model.moe.capacity_factor=-1.0 must be >= 0')
  assert not workdir.exists()


@pytest.mark.parametrize('flags, fields', [
    (['--config.model.moe.capacity_factor=nan'], ['model.moe.capacity_factor=nan']),
    (['--config.model.moe.eval_capacity_factor=-0.5'], ['model.moe.eval_capacity_factor=-0.5']),
    (['--config.model.moe.dispatch=dropless'],
     ['model.moe.dispatch=dropless', 'model.moe.capacity_factor=0']),
    (['--config.model.moe.capacity_factor=0', '--config.model.moe.dispatch=einsum'],
     ['model.moe.dispatch=einsum', 'model.moe.capacity_factor=0']),
    (['--config.model.moe.capacity_factor=0', '--config.model.moe.router=expert_choice',
      '--config.train.sample_tokens=0'],
     ['model.moe.capacity_factor=0', 'model.moe.router=expert_choice']),
    (['--config.model.mtp_layers=-1'], ['model.mtp_layers=-1 must be >= 0']),
    (['--config.model.moe.exchange_overlap=block', '--config.model.moe.aux_loss=global'],
     ['model.moe.exchange_overlap=block', 'model.moe.aux_loss=global']),
    (['--config.model.moe.router=top_p', '--config.model.moe.top_p_threshold=0'],
     ['model.moe.top_p_threshold=0', '(0, 1]']),
    (['--config.model.moe.router=top_p', '--config.model.moe.top_p_threshold=1.5'],
     ['model.moe.top_p_threshold=1.5', '(0, 1]']),
    (['--config.model.moe.router=top_p', '--config.model.moe.top_k=9'],
     ['model.moe.top_k=9', 'model.moe.num_experts=8']),
    (['--config.model.moe.router=top_p', '--config.model.moe.bias_update_rate=0.001'],
     ['model.moe.bias_update_rate=0.001', 'model.moe.router=top_p']),
    (['--config.model.moe.exchange_overlap=layer'],
     ["model.moe.exchange_overlap='layer'", 'experts, block']),
    (['--config.model.attention_experts=-1'], ['model.attention_experts=-1']),
    (['--config.model.attention=mla', '--config.model.attention_experts=2'],
     ['model.attention_experts=2', 'mha']),
    (['--config.model.attention_experts=3', '--config.init.upcycle_from=a,b'],
     ['model.attention_experts=3', 'init.upcycle_from']),
    (['--config.model.attention_experts_share_kv=True'],
     ['model.attention_experts_share_kv', 'model.attention_experts']),
])
def test_refusals_name_the_fields(tmp_path, capsys, flags, fields):
  """Dropless is capacity_factor=0 and nothing else: every other way of saying it, or a
  contradiction, is one line naming the fields, status 2, nothing written. So is a negative
  multi-token-prediction depth, or one with pipeline stages, chunks of the whole block with a
  balance loss pooled over the batch, a top-p threshold or cap out of range, and attention
  experts that are negative, with MLA, or not one per upcycled dense model."""
  workdir = tmp_path / 'w'
  assert train.main(['--config', 'configs/tiny.py', '--workdir', str(workdir), *flags]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and all(field in lines[0] for field in fields), lines
  assert not workdir.exists()


def test_stages_without_a_scanned_stack(tmp_path):
  workdir = tmp_path / 'w'
  expect_one_line_error(run_cli('--config', 'configs/tiny.py', '--workdir', str(workdir),
                                '--config.mesh.stage=2', '--config.train.microbatches=2'),
                        'mesh.stage=2 needs model.scan_layers=True')
  assert not workdir.exists()
