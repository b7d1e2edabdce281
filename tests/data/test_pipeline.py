import numpy as np
import pytest

from moetrain.data import pipeline, sources, tokenizer
from moetrain.data.tokenizer import EOS_ID, PAD_ID


@pytest.fixture(scope='module')
def stdlib_tok():
  return tokenizer.load_or_train_stdlib_tokenizer(8000)


def _rows(num_rows, seq_len=6):
  # Row r starts with token r + 1, so a row is identified by inputs[:, 0].
  stream = np.arange(1, num_rows * seq_len + 2, dtype=np.int32)
  rows = pipeline.pack(stream, seq_len)
  assert len(rows) == num_rows
  return rows


def _row_ids(batch):
  return list(batch['inputs'][:, 0])


@pytest.mark.parametrize('length', [2, 3, 7, 8, 9, 10, 31, 100])
@pytest.mark.parametrize('seq_len', [1, 4, 8])
def test_pack_keeps_every_token_once(length, seq_len):
  stream = np.random.default_rng(length).integers(1, 50, size=length).astype(np.int32)
  rows = pipeline.pack(stream, seq_len)
  assert rows.dtype == np.int32 and rows.shape[1] == seq_len + 1
  assert len(rows) == -(-(length - 1) // seq_len)

  inputs, targets = rows[:, :-1].ravel(), rows[:, 1:].ravel()
  # Every token with a successor is an input once; every token but the first a target once.
  np.testing.assert_array_equal(inputs[: length - 1], stream[:-1])
  np.testing.assert_array_equal(targets[: length - 1], stream[1:])
  assert np.all(targets[length - 1 :] == PAD_ID)
  # Consecutive rows share exactly one token.
  np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
  # Padding only at the end of the last row.
  assert np.all(rows[:-1] != PAD_ID)
  num_pad = int((rows[-1] == PAD_ID).sum())
  assert np.all(rows[-1, seq_len + 1 - num_pad :] == PAD_ID)
  assert num_pad == len(rows) * seq_len + 1 - length


def test_pack_without_targets_gives_no_rows():
  for stream in ([], [5]):
    assert pipeline.pack(np.array(stream, dtype=np.int32), 4).shape == (0, 5)


def test_train_batches_shapes_and_determinism():
  rows = _rows(37)
  it = pipeline.train_batches(rows, 4, seed=1)
  batches = [next(it) for _ in range(12)]
  again = pipeline.train_batches(rows, 4, seed=1)
  other = pipeline.train_batches(rows, 4, seed=2)
  for batch in batches:
    assert set(batch) == {'inputs', 'targets'}
    for value in batch.values():
      assert value.shape == (4, 6) and value.dtype == np.int32
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
  assert [_row_ids(b) for b in batches] == [_row_ids(next(again)) for _ in batches]
  assert [_row_ids(b) for b in batches] != [_row_ids(next(other)) for _ in batches]


def test_train_batches_reshuffle_each_epoch():
  rows = _rows(10)
  it = pipeline.train_batches(rows, 5, seed=0)
  epochs = [sum((_row_ids(next(it)) for _ in range(2)), []) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == sorted(rows[:, 0])
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_partition_the_global_batch(process_count):
  rows = _rows(29)
  global_it = pipeline.train_batches(rows, 8, seed=3)
  local_its = [
      pipeline.train_batches(rows, 8, seed=3, process_index=p, process_count=process_count)
      for p in range(process_count)
  ]
  for _ in range(6):
    whole = next(global_it)
    parts = [next(it) for it in local_its]
    for p, part in enumerate(parts):
      assert part['inputs'].shape == (8 // process_count, 6)
      np.testing.assert_array_equal(part['inputs'], whole['inputs'][p::process_count])
    union = sorted(sum((_row_ids(part) for part in parts), []))
    assert union == sorted(_row_ids(whole))


def test_train_batches_rejects_bad_sharding():
  with pytest.raises(ValueError):
    pipeline.train_batches(_rows(8), 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError):
    pipeline.train_batches(_rows(8), 4, seed=0, process_index=2, process_count=2)


def test_iterator_state_restores_position():
  rows = _rows(23)
  it = pipeline.train_batches(rows, 4, seed=5, process_index=1, process_count=2)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [_row_ids(next(it)) for _ in range(5)]

  fresh = pipeline.train_batches(rows, 4, seed=5, process_index=1, process_count=2)
  fresh.set_state(state)
  assert [_row_ids(next(fresh)) for _ in range(5)] == expected


def test_global_start_row_resumes_on_another_process_count():
  rows = _rows(29)
  one_process = pipeline.train_batches(rows, 8, seed=3)
  for _ in range(3):
    next(one_process)  # a run on one process checkpoints after 3 batches: 24 rows
  two_processes = [pipeline.train_batches(rows, 8, seed=3, process_index=p, process_count=2,
                                          start_row=24) for p in range(2)]
  for _ in range(5):  # ... and resumes on two, across an epoch boundary
    whole = next(one_process)
    for p, it in enumerate(two_processes):
      np.testing.assert_array_equal(next(it)['inputs'], whole['inputs'][p::2])


def test_eval_batches_spread_evenly_in_order_and_sharded():
  rows = _rows(24)
  batches = pipeline.eval_batches(rows, 4, num_batches=3)
  assert len(batches) == 3
  spread = rows[::2]  # 12 of 24 rows: every second one, covering the whole split
  np.testing.assert_array_equal(np.concatenate([b['inputs'] for b in batches]), spread[:, :-1])
  np.testing.assert_array_equal(np.concatenate([b['targets'] for b in batches]), spread[:, 1:])
  assert [_row_ids(b) for b in batches] == [_row_ids(b) for b in pipeline.eval_batches(rows, 4, 3)]

  halves = [pipeline.eval_batches(rows, 4, 3, process_index=p, process_count=2) for p in (0, 1)]
  for step, whole in enumerate(batches):
    for p in (0, 1):
      np.testing.assert_array_equal(halves[p][step]['inputs'], whole['inputs'][p::2])


def test_eval_batches_on_a_tiny_split_pad_fully():
  rows = _rows(3)
  batches = pipeline.eval_batches(rows, 4, num_batches=10)
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]['inputs'][:3], rows[:, :-1])
  assert np.all(batches[0]['inputs'][3] == PAD_ID) and np.all(batches[0]['targets'][3] == PAD_ID)
  assert len(pipeline.eval_batches(_rows(9), 4, num_batches=10)) == 3


def test_tokenized_stdlib_documents_and_cache(stdlib_tok, tmp_path, monkeypatch):
  monkeypatch.setenv('MOETRAIN_CACHE', str(tmp_path))
  files = sources.stdlib_files('eval')
  stream = pipeline.tokenized_stdlib('eval', stdlib_tok)
  assert stream.dtype == np.int32 and stream.ndim == 1
  assert int((stream == EOS_ID).sum()) == len(files) and stream[-1] == EOS_ID
  # Documents decode back to the files, in file order.
  ends = np.flatnonzero(stream == EOS_ID)
  starts = np.concatenate([[0], ends[:-1] + 1])
  for path, start, end in zip(files, starts, ends):
    assert stdlib_tok.decode(stream[start:end].tolist()) == sources.read_text(path)
  assert len(list((tmp_path / 'corpus').glob('*.npy'))) == 1

  def no_reading(path):
    raise AssertionError('re-tokenised instead of loading the cache')

  monkeypatch.setattr(sources, 'read_text', no_reading)
  np.testing.assert_array_equal(pipeline.tokenized_stdlib('eval', stdlib_tok), stream)


def test_tokenized_stdlib_train_split(stdlib_tok):
  # The real cache: tokenised once, then shared with training runs.
  stream = pipeline.tokenized_stdlib('train', stdlib_tok)
  assert int((stream == EOS_ID).sum()) == len(sources.stdlib_files('train'))
  assert stream.size > 1_000_000 and PAD_ID not in stream[:100_000]
