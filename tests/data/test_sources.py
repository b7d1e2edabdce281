import pathlib

import pytest

from moetrain.data import sources


@pytest.fixture(scope='module')
def splits():
  return {split: sources.stdlib_files(split) for split in sources.SPLITS}


def _names(paths):
  return [sources.relative_name(p) for p in paths]


def test_file_lists_are_deterministic_and_sorted(splits):
  for split, files in splits.items():
    assert files == sources.stdlib_files(split)
    names = _names(files)
    assert names == sorted(names)
    assert all(p.suffix == '.py' and p.is_file() for p in files)


def test_splits_are_disjoint_and_eval_is_small(splits):
  train, evals = set(_names(splits['train'])), set(_names(splits['eval']))
  assert not train & evals
  assert len(evals) > 0
  assert len(evals) < 0.08 * (len(train) + len(evals))
  # Core modules are in the corpus, whichever split they fall in.
  assert {'os.py', 'json/__init__.py', 'unittest/case.py'} <= train | evals


def test_no_tests_third_party_or_bytecode(splits):
  for name in _names(splits['train'] + splits['eval']):
    folders = pathlib.PurePosixPath(name).parts[:-1]
    for folder in folders:
      assert folder not in {'site-packages', 'dist-packages', '__pycache__'}, name
      assert not folder.startswith('test') and not folder.endswith('_test'), name


def test_unknown_split_raises():
  with pytest.raises(ValueError, match='validation'):
    sources.stdlib_files('validation')


def test_read_text_policy(tmp_path):
  path = tmp_path / 'x.py'
  path.write_bytes("a = 'ï'\r\nb = 2\r\n".encode('utf-8'))
  assert sources.read_text(path) == "a = 'ï'\nb = 2\n"
  path.write_bytes(b"bad = b'\xff'\n")
  assert sources.read_text(path) == "bad = b'\ufffd'\n"
