"""tools/prepare_dataset.py: TFDS datasets built from files and read back without TensorFlow."""

import importlib.util
import json
import pathlib
import pickle
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from moetrain.data import documents
from moetrain.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [f'document {i}: ü ✓\n\tindented' for i in range(120)]


def _load_tool():
  spec = importlib.util.spec_from_file_location('prepare_dataset',
                                                ROOT / 'tools' / 'prepare_dataset.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


prepare_dataset = _load_tool()


def _write_jsonl(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A data_dir with tiny_docs (from jsonl, 10% eval) and tiny_text (from text files)."""
  root = tmp_path_factory.mktemp('prepare')
  jsonl = _write_jsonl(root / 'in' / 'docs.jsonl', [json.dumps({'text': t}) for t in TEXTS])
  for i in range(40):
    (root / 'in' / 'text' / f'{i:02d}.txt').parent.mkdir(exist_ok=True)
    (root / 'in' / 'text' / f'{i:02d}.txt').write_text(f'text file {i}')
  data_dir = root / 'data'
  assert prepare_dataset.main(['--name', 'tiny_docs', '--data_dir', str(data_dir), '--jsonl',
                               str(jsonl), '--eval_per_mille', '100']) == 0
  assert prepare_dataset.main(['--name', 'tiny_text', '--data_dir', str(data_dir), '--text',
                               f'{root}/in/text/*.txt', '--eval_per_mille', '200']) == 0
  return root


def _read(data_dir, split, name='tiny_docs'):
  return list(documents.open_source('tfds', tfds_name=name, data_dir=str(data_dir), split=split))


def test_tiny_tfds_dataset_is_read_without_tensorflow_deterministically(built):
  data_dir = built / 'data'
  train, evals = _read(data_dir, 'train'), _read(data_dir, 'eval')
  assert evals and train == _read(data_dir, 'train') and evals == _read(data_dir, 'eval')
  # The same documents, in the same order, as the jsonl source it was built from.
  jsonl = str(built / 'in' / 'docs.jsonl')
  assert train == list(documents.open_source('jsonl', jsonl, eval_per_mille=100))
  assert sorted(train + evals) == sorted(TEXTS)
  # A fresh process reads it and never imports TensorFlow; this environment has none to import
  # (the test extra leaves it out, as users may).
  code = textwrap.dedent(f"""
      import json, sys
      from moetrain.data import documents
      docs = {{split: list(documents.open_source('tfds', tfds_name='tiny_docs',
                                                 data_dir={str(data_dir)!r}, split=split))
              for split in ('train', 'eval')}}
      assert 'tensorflow' not in sys.modules, 'reading imported tensorflow'
      try:
        import tensorflow
      except ImportError:
        pass
      else:
        raise SystemExit('tensorflow is installed: this check needs an environment without it')
      print(json.dumps(docs))""")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.splitlines()[-1]) == {'train': train, 'eval': evals}


def test_text_files_become_a_dataset_and_tfds_errors_are_one_line(built):
  data_dir = built / 'data'
  texts = _read(data_dir, 'train', 'tiny_text') + _read(data_dir, 'eval', 'tiny_text')
  assert sorted(texts) == sorted(f'text file {i}' for i in range(40))
  # grain's worker processes receive sources pickled.
  source = documents.open_source('tfds', tfds_name='tiny_text', data_dir=str(data_dir))
  assert list(pickle.loads(pickle.dumps(source))) == list(source)
  with pytest.raises(ConfigError) as error:
    _read(data_dir, 'validation')
  assert str(error.value) == ("tfds dataset 'tiny_docs' split 'validation': Unknown split "
                              "'validation'. Should be one of ['train', 'eval'].")
  with pytest.raises(ConfigError, match=r"no feature 'body' \(features: text\)"):
    documents.open_source('tfds', tfds_name='tiny_docs', data_dir=str(data_dir),
                          text_field='body')


def test_documents_from_config_mixes_tfds_datasets(built):
  data = ml_collections.ConfigDict(dict(
      source='tfds', path='', data_dir=str(built / 'data'), tfds_name='tiny_docs, tiny_text',
      text_field='text', weights='', on_bad_record='error', split='train', eval_split='eval'))
  mixed = documents.documents_from_config(data, 'train')
  draws = [mixed[i] for i in range(60)]
  assert sum(d.startswith('text file') for d in draws) == 30
  evals = documents.documents_from_config(data, 'eval')
  assert set(evals[i] for i in range(len(evals))) <= set(_read(built / 'data', 'eval')
                                                         + _read(built / 'data', 'eval',
                                                                 'tiny_text'))


def _fails(capsys, argv, *expected):
  assert prepare_dataset.main(argv) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('prepare_dataset: error: '), lines
  for text in expected:
    assert text in lines[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(built, tmp_path, capsys):
  out = tmp_path / 'out'
  bad = _write_jsonl(tmp_path / 'bad.jsonl', ['{"text": "a"}', '{"text": 1}'])
  _fails(capsys, ['--name', 'x', '--data_dir', str(out), '--text', f'{tmp_path}/*.txt'],
         'no files match')
  _fails(capsys, ['--name', 'x', '--data_dir', str(out), '--jsonl', str(bad)],
         f'{bad}:2: field')
  _fails(capsys, ['--name', 'x', '--data_dir', str(out), '--jsonl', str(bad),
                  '--eval_per_mille', '0', '--on_bad_record', 'skip'], "'eval' has no documents")
  _fails(capsys, ['--name', 'Bad-Name', '--data_dir', str(out), '--jsonl', str(bad)], 'snake')
  _fails(capsys, ['--name', 'mnist', '--data_dir', str(out), '--jsonl', str(bad)], 'TFDS')
  assert not out.exists()
  existing = built / 'data' / 'tiny_docs' / '1.0.0'
  before = {p: p.stat().st_mtime_ns for p in existing.iterdir()}
  _fails(capsys, ['--name', 'tiny_docs', '--data_dir', str(built / 'data'), '--jsonl',
                  str(built / 'in' / 'docs.jsonl')], f'{existing} already exists')
  assert {p: p.stat().st_mtime_ns for p in existing.iterdir()} == before


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
  class Broken(list):
    def __getitem__(self, index):
      if index == 3:
        raise RuntimeError('disk on fire')
      return super().__getitem__(index)

  monkeypatch.setattr(documents, 'open_source', lambda *a, **k: Broken(['a'] * 10))
  with pytest.raises(RuntimeError, match='disk on fire'):
    prepare_dataset.main(['--name', 'broken', '--data_dir', str(tmp_path), '--text', 'x'])
  assert list(tmp_path.iterdir()) == []
  assert not list(tmp_path.rglob('*.array_record*'))


def test_command_line_runs_from_a_checkout(tmp_path):
  result = subprocess.run([sys.executable, 'tools/prepare_dataset.py', '--name', 'x',
                           '--data_dir', str(tmp_path), '--parquet', str(tmp_path / 'none')],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"prepare_dataset: error: parquet source: no files match "
                                   f"'{tmp_path / 'none'}'")
