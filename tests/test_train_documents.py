"""Training from document sources through the command line: runs, resumes, refuses bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moetrain import train
from moetrain.data import sources
from moetrain.data.tokenizer import load_or_train_stdlib_tokenizer, stdlib_tokenizer_path
from tests.test_launch import ROOT
from tests.devices import free_port, xla_flags

SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.log_every=1',
         '--config.train.eval_every=2', '--config.train.eval_batches=2',
         '--config.train.sample_tokens=0', '--config.train.warmup_steps=2']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(jsonl path, tokenizer path): 200 files of the embedded corpus as jsonl documents."""
  load_or_train_stdlib_tokenizer(8000)
  path = tmp_path_factory.mktemp('data') / 'stdlib.jsonl'
  with path.open('w') as out:
    for file in sources.stdlib_files('train')[:200]:
      out.write(json.dumps({'text': sources.read_text(file)}) + '\n')
  return path, stdlib_tokenizer_path(8000)


def run(workdir, corpus, steps, *extra):
  path, tokenizer = corpus
  return train.main(['--config', 'configs/tiny.py', '--workdir', str(workdir), *SMALL,
                     '--config.data.source=jsonl', f'--config.data.path={path}',
                     f'--config.data.tokenizer={tokenizer}', f'--config.train.steps={steps}',
                     *extra])


def losses(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in records if r.get('split') != 'eval' and 'loss' in r}


def test_a_resumed_run_reads_the_same_batches_as_an_uninterrupted_one(corpus, tmp_path):
  # A process per run, as a resume is, compiled as training compiles: the tests' quick
  # compiles can round a resumed step's loss differently in the last bit (in one process with
  # XLA:CPU's loop emitters; across processes without XLA's optimisations).
  path, tokenizer = corpus
  for workdir, steps in (('whole', 4), ('split', 2), ('split', 4)):
    done = subprocess.run(
        [sys.executable, '-m', 'moetrain.train', '--config', 'configs/tiny.py', '--workdir',
         str(tmp_path / workdir), *SMALL, '--config.data.source=jsonl',
         f'--config.data.path={path}', f'--config.data.tokenizer={tokenizer}',
         f'--config.train.steps={steps}', '--config.train.checkpoint_every=2'],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=xla_flags(1),
                 JAX_DISABLE_MOST_OPTIMIZATIONS='0'))
    assert done.returncode == 0, done.stderr[-3000:]
  whole, split = losses(tmp_path / 'whole'), losses(tmp_path / 'split')
  assert sorted(whole) == [1, 2, 3, 4]
  assert whole == split  # steps 3 and 4 saw the same batches after the restart


def _refusal(capsys, workdir, corpus, *extra):
  code = run(workdir, corpus, 1, *extra)
  error = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(error) == 1, error
  assert not (workdir / 'checkpoints').exists()
  return error[0]


def test_a_malformed_jsonl_line_is_named_or_skipped(corpus, tmp_path, capsys):
  bad = tmp_path / 'bad.jsonl'
  lines = corpus[0].read_text().splitlines()
  bad.write_text('\n'.join(lines[:5] + ['{"text": "unfinished'] + lines[5:]) + '\n')
  message = _refusal(capsys, tmp_path / 'w', corpus, f'--config.data.path={bad}')
  assert f'{bad}:6' in message
  assert run(tmp_path / 'skip', corpus, 1, f'--config.data.path={bad}',
             '--config.data.on_bad_record=skip') == 0
  notices = [line for line in capsys.readouterr().err.splitlines() if 'skipped' in line]
  # Line 6 lands in one split; that split's notice counts it (printed once per use).
  assert notices and all('skipped 1 malformed records' in n and f'{bad}:6' in n
                         for n in notices)


def test_an_empty_source_a_missing_field_and_an_unknown_dataset_are_named(corpus, tmp_path,
                                                                          capsys):
  message = _refusal(capsys, tmp_path / 'w1', corpus,
                     f'--config.data.path={tmp_path / "nothing*.jsonl"}')
  assert 'nothing*.jsonl' in message
  message = _refusal(capsys, tmp_path / 'w2', corpus, '--config.data.text_field=body')
  assert 'body' in message and str(corpus[0]) in message
  message = _refusal(capsys, tmp_path / 'w3', corpus, '--config.data.source=tfds',
                     '--config.data.tfds_name=no_such_dataset',
                     f'--config.data.data_dir={tmp_path}', '--config.data.path=')
  assert 'no_such_dataset' in message


def draw(out, corpus, steps, save_after, processes, position=None):
  """[steps, batch, seq_len] global batches that `processes` processes draw (elastic_batches)."""
  path, tokenizer = corpus
  out.mkdir()
  args = ['--config', 'configs/tiny.py', '--workdir', str(out), *SMALL,
          '--config.data.source=jsonl',
          f'--config.data.path={path}', f'--config.data.tokenizer={tokenizer}']
  port = free_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags(8 // processes))
  env.pop('MOETRAIN_DISTRIBUTED', None)
  children = [subprocess.Popen(
      [sys.executable, '-m', 'tests.data.elastic_batches', str(out), str(steps), str(save_after),
       *([str(position)] if position else []), '--', *args,
       *(['--coordinator_address', f'127.0.0.1:{port}', '--num_processes', str(processes),
          '--process_id', str(p)] if processes > 1 else [])],
      cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for p in range(processes)]
  for child in children:
    assert child.wait(timeout=300) == 0, child.stderr.read()[-3000:]
  shares = [np.load(out / f'batches-{p}.npz') for p in range(processes)]
  batches = np.zeros((steps, 8, 32), np.int32)
  for share in shares:
    batches[:, share['lanes']] = share['inputs']
  return batches


@pytest.mark.parametrize('saved_on, resumed_on', [(2, 1), (1, 2)])
def test_data_saved_on_n_processes_resumes_on_m_with_the_uninterrupted_batches(
    corpus, tmp_path, saved_on, resumed_on):
  whole = draw(tmp_path / 'whole', corpus, 8, 3, saved_on)
  resumed = draw(tmp_path / 'resumed', corpus, 5, 0, resumed_on,
                 tmp_path / 'whole' / 'position.json')
  np.testing.assert_array_equal(resumed, whole[3:])  # token for token
