import collections
import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import grain
import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moetrain.data import documents, sources
from moetrain.errors import ConfigError


def _one_line(error_info):
  message = str(error_info.value)
  assert '\n' not in message, message
  return message


def _splits(kind, path, **kwargs):
  return {split: list(documents.open_source(kind, path, split=split, **kwargs))
          for split in documents.FILE_SPLITS}


def _check_split(splits, everything):
  train, evals = splits['train'], splits['eval']
  assert train and evals
  assert sorted(train + evals) == sorted(everything)
  assert not set(train) & set(evals)


def _write_jsonl(path, lines):
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return path


@pytest.fixture
def text_dir(tmp_path):
  folder = tmp_path / 'corpus'
  (folder / 'sub').mkdir(parents=True)
  for i in range(30):
    (folder / ('sub' if i % 3 else '.') / f'doc{i:02d}.txt').write_text(f'document {i}\r\nü')
  (folder / 'odd.txt').write_bytes(b'bad \xff byte')
  return folder


def test_text_files_are_documents_split_by_path(text_dir, tmp_path):
  everything = [f'document {i}\nü' for i in range(30)] + ['bad \ufffd byte']
  pattern = f'{text_dir}/**/*.txt'
  splits = _splits('text', pattern, eval_per_mille=200)
  _check_split(splits, everything)
  assert splits == _splits('text', pattern, eval_per_mille=200)
  # The split depends on names below the pattern's fixed part, not on where the data lives.
  moved = tmp_path / 'elsewhere' / 'copy'
  shutil.copytree(text_dir, moved)
  assert _splits('text', f'{moved}/**/*.txt', eval_per_mille=200) == splits


def test_text_paths_are_sorted_and_deduplicated(text_dir):
  both = f'{text_dir}/doc00.txt, {text_dir}/*.txt,{text_dir}/doc00.txt'
  train = documents.open_source('text', both, eval_per_mille=0)
  assert len(train) == 11  # doc00, doc03, ..., doc27 and odd.txt, each once
  assert train[0] == 'document 0\nü' and train[len(train) - 1] == 'bad \ufffd byte'
  assert len(documents.open_source('text', str(text_dir), eval_per_mille=0)) == 31


def test_jsonl_lines_are_documents(tmp_path):
  texts = [f'line {i} with "quotes" and ✓' for i in range(100)]
  first = _write_jsonl(tmp_path / 'a.jsonl', [json.dumps({'text': t, 'id': i})
                                              for i, t in enumerate(texts[:60])] + ['', '  '])
  _write_jsonl(tmp_path / 'b.jsonl', [json.dumps({'body': t}) for t in texts[60:]])
  path = f'{first},{tmp_path}/b.jsonl'
  with pytest.raises(ConfigError, match='b.jsonl:1: no field'):
    documents.open_source('jsonl', path)
  splits = _splits('jsonl', f'{first}', eval_per_mille=100)
  _check_split(splits, texts[:60])
  source = documents.open_source('jsonl', f'{tmp_path}/b.jsonl', text_field='body')
  assert len(source) + len(documents.open_source('jsonl', f'{tmp_path}/b.jsonl',
                                                 text_field='body', split='eval')) == 40
  # Random access reads each line on demand, in any order.
  assert [source[i] for i in reversed(range(len(source)))] == list(source)[::-1]
  assert pickle.loads(pickle.dumps(source))[3] == source[3]
  assert repr(source).startswith('JsonlSource(')


@pytest.mark.parametrize('line, problem', [
    ('{"text": "ok"', "not JSON (Expecting ',' delimiter: column 14)"),
    ('{"text": "unfinished', 'not JSON (Unterminated string starting at: column 10)'),
    ('[1, 2]', 'not a JSON object (a list)'),
])
def test_jsonl_malformed_line_is_named_with_the_setting_that_skips_it(tmp_path, line, problem):
  path = _write_jsonl(tmp_path / 'bad.jsonl', ['{"text": "a"}', '', line, '{"text": "b"}'])
  with pytest.raises(ConfigError) as error:
    documents.open_source('jsonl', str(path))
  assert _one_line(error) == (f'jsonl {path}:3: {problem}; set data.on_bad_record=skip to skip '
                              'such lines')


@pytest.mark.parametrize('line, problem', [
    ('{"body": "x", "id": 7}', "no field 'text' (keys: 'body', 'id')"),
    ('{}', "no field 'text' (keys: none)"),
    ('{"text": 5}', "field 'text' is int, not a string"),
])
def test_jsonl_record_without_a_text_names_data_text_field(tmp_path, line, problem):
  path = _write_jsonl(tmp_path / 'bad.jsonl', ['{"text": "a"}', line])
  with pytest.raises(ConfigError) as error:
    documents.open_source('jsonl', str(path))
  assert _one_line(error) == (f'jsonl {path}:2: {problem}; set data.text_field to the key that '
                              'holds the text, or data.on_bad_record=skip to skip such lines')


def test_a_tool_with_flags_gets_them_named_instead_of_the_config_fields(tmp_path):
  path = _write_jsonl(tmp_path / 'bad.jsonl', ['{"body": "x"}'])
  with pytest.raises(ConfigError) as error:
    documents.open_source('jsonl', str(path), settings='--')
  assert _one_line(error).endswith('set --text_field to the key that holds the text, or '
                                   '--on_bad_record=skip to skip such lines')


def test_jsonl_skip_mode_counts_bad_lines(tmp_path):
  lines = [json.dumps({'text': f'doc {i}'}) if i % 5 else 'garbage' for i in range(200)]
  path = _write_jsonl(tmp_path / 'mixed.jsonl', lines)
  parts = [documents.open_source('jsonl', str(path), split=split, on_bad_record='skip')
           for split in documents.FILE_SPLITS]
  assert sum(part.skipped for part in parts) == 40
  assert sum(len(part) for part in parts) == 160
  assert parts[0].first_bad.startswith(f'{path}:') and 'not JSON' in parts[0].first_bad
  with pytest.raises(ConfigError, match='on_bad_record'):
    documents.open_source('jsonl', str(path), on_bad_record='ignore')


def _write_parquet(path, texts, row_group_size=7, column='text'):
  pq.write_table(pa.table({column: texts, 'n': list(range(len(texts)))}), path,
                 row_group_size=row_group_size)
  return path


def test_parquet_column_read_by_row_group(tmp_path):
  texts = [f'row {i} ✓' for i in range(90)]
  _write_parquet(tmp_path / 'a.parquet', texts[:50])
  _write_parquet(tmp_path / 'b.parquet', texts[50:], row_group_size=4)
  pattern = f'{tmp_path}/*.parquet'
  splits = _splits('parquet', pattern, eval_per_mille=150)
  _check_split(splits, texts)
  assert splits == _splits('parquet', pattern, eval_per_mille=150)
  source = documents.open_source('parquet', pattern, eval_per_mille=150)
  order = list(range(len(source)))[::7] + list(range(len(source)))[::-3]
  assert [source[i] for i in order] == [splits['train'][i] for i in order]
  assert list(pickle.loads(pickle.dumps(source))) == splits['train']


def test_parquet_bad_column_is_named(tmp_path):
  path = _write_parquet(tmp_path / 'p.parquet', ['x', 'y'], column='content')
  with pytest.raises(ConfigError) as error:
    documents.open_source('parquet', str(path))
  assert _one_line(error) == (f"parquet {path}: no column 'text' (columns: content, n); set "
                              'data.text_field to the one that holds the text')
  with pytest.raises(ConfigError, match="column 'n' is int64, not a string"):
    documents.open_source('parquet', str(path), text_field='n')
  (tmp_path / 'junk.parquet').write_text('not parquet')
  with pytest.raises(ConfigError, match='junk.parquet'):
    documents.open_source('parquet', str(tmp_path / 'junk.parquet'))


def test_empty_sources_are_named(tmp_path):
  with pytest.raises(ConfigError) as error:
    documents.open_source('text', f'{tmp_path}/*.txt')
  assert "text source: no files match '" in _one_line(error)
  path = _write_jsonl(tmp_path / 'blank.jsonl', ['', ' '])
  with pytest.raises(ConfigError) as error:
    documents.open_source('jsonl', str(path))
  assert f"jsonl '{path}': split 'train' has no documents" == _one_line(error)
  _write_jsonl(path, ['{"text": "one"}'])
  with pytest.raises(ConfigError, match="split 'eval' has no documents"):
    documents.open_source('jsonl', str(path), split='eval', eval_per_mille=0)
  with pytest.raises(ConfigError, match="split 'validation' must be train or eval"):
    documents.open_source('jsonl', str(path), split='validation')


def test_unknown_tfds_dataset_is_named(tmp_path):
  with pytest.raises(ConfigError) as error:
    documents.open_source('tfds', tfds_name='no_such_docs', data_dir=str(tmp_path))
  assert _one_line(error) == f"tfds dataset 'no_such_docs' not found in data_dir '{tmp_path}'"
  with pytest.raises(ConfigError, match="dataset 'Bad-Name': Parsing builder name"):
    documents.open_source('tfds', tfds_name='Bad-Name', data_dir=str(tmp_path))
  # A dataset TFDS knows but that is not in data_dir must fail, not start a download.
  with pytest.raises(ConfigError, match="'mnist' is not prepared in data_dir"):
    documents.open_source('tfds', tfds_name='mnist', data_dir=str(tmp_path))


def test_mixture_follows_weights_deterministically():
  small, large = [f'a{i}' for i in range(200)], [f'b{i}' for i in range(5000)]
  mixed = documents.mixture([small, large], [1.0, 3.0])
  draws = [mixed[i] for i in range(len(mixed))]
  share = collections.Counter(d[0] for d in draws)['a'] / len(draws)
  assert abs(share - 0.25) < 0.01
  assert draws == [mixed[i] for i in range(len(mixed))]
  scaled = documents.mixture([small, grain.MapDataset.source(large)], [2, 6])
  assert draws == [scaled[i] for i in range(len(scaled))]
  # One pass reads every document; the small source is upsampled to its weight.
  assert set(draws) == set(small + large)
  assert len(large) * 4 / 3 <= len(mixed) < len(large) * 4 / 3 + 10


def test_mixture_covers_every_document_of_awkward_sizes():
  for sizes, weights in (([50, 100, 100], [2, 3, 3]), ([1, 7, 300], [0.01, 5, 0.3]),
                         ([100, 50, 50, 100], [2, 1.72, 3, 2]), ([3], [0.5])):
    parts = [[(i, j) for j in range(size)] for i, size in enumerate(sizes)]
    mixed = documents.mixture(parts, weights)
    assert {mixed[i] for i in range(len(mixed))} == {doc for part in parts for doc in part}


@pytest.mark.parametrize('weights, message', [
    ([1.0], '1 weights for 2 sources'),
    ([1.0, 0.0], 'must be positive'),
    ([1.0, -2.0], 'must be positive'),
    ([1.0, float('nan')], 'must be positive'),
])
def test_mixture_rejects_bad_weights(weights, message):
  with pytest.raises(ConfigError, match=message):
    documents.mixture([['a'], ['b']], weights)


def _data_config(**fields):
  data = ml_collections.ConfigDict(dict(
      source='jsonl', path='', data_dir='', tfds_name='', text_field='text', weights='',
      on_bad_record='error', split='train', eval_split='eval'))
  data.update(fields)
  return data


def test_documents_from_config(tmp_path):
  for name, count in (('a', 300), ('b', 100)):
    _write_jsonl(tmp_path / f'{name}.jsonl',
                 [json.dumps({'text': f'{name}{i}'}) for i in range(count)])
  both = f'{tmp_path}/a.jsonl,{tmp_path}/b.jsonl'
  whole = documents.documents_from_config(_data_config(path=both), 'train')
  evals = documents.documents_from_config(_data_config(path=both), 'eval')
  assert len(whole) + len(evals) == 400 and not set(whole) & set(evals)
  mixed = documents.documents_from_config(_data_config(path=both, weights='1,1'), 'train')
  share = sum(doc.startswith('a') for doc in mixed) / len(mixed)
  assert abs(share - 0.5) < 0.02
  with pytest.raises(ConfigError, match='data.weights has 3 values for 2 entries of data.path'):
    documents.documents_from_config(_data_config(path=both, weights='1,2,3'), 'train')
  for weights in ('1,x', '1,0'):
    with pytest.raises(ConfigError, match=f"data.weights='{weights}' must be comma-separated "
                                          'positive numbers'):
      documents.documents_from_config(_data_config(path=both, weights=weights), 'train')
  with pytest.raises(ConfigError, match="data.eval_split='validation' must be train or eval"):
    documents.documents_from_config(_data_config(path=both, eval_split='validation'), 'eval')
  with pytest.raises(ConfigError, match='data.tfds_name is empty'):
    documents.documents_from_config(_data_config(source='tfds'), 'train')
  stdlib = documents.documents_from_config(_data_config(source='stdlib'), 'eval')
  assert len(stdlib) == len(sources.stdlib_files('eval'))  # the embedded corpus's files
  assert stdlib[0] == sources.read_text(sources.stdlib_files('eval')[0])


def test_tensorflow_datasets_and_pyarrow_are_imported_lazily():
  code = ('import sys; import moetrain.data.documents; '
          'print([m for m in ("tensorflow_datasets", "pyarrow", "tensorflow") '
          'if m in sys.modules])')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=pathlib.Path(__file__).parents[2])
  assert result.stdout.strip() == '[]'
