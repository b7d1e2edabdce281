"""Batches of packed documents that do not depend on the number of processes.

Row j of every global batch comes from lane j (``batch_size`` lanes). Lane j reads documents
j, j + B, j + 2B, … of the global document order (B lanes), tokenizes each and ends it with
``EOS_ID``, and cuts that stream into rows of ``seq_len + 1`` tokens (concatenate, then
split: every token lands in exactly one row). A process computes only the lanes of the batch
rows its devices hold. So the global batches are the same on any number of processes, and the
position, per lane the documents begun and the tokens of the last one used, is global too: a
checkpoint saved on N processes resumes on M.

A batch is ``{'inputs': int32 [rows, seq_len], 'targets': int32 [rows, seq_len]}`` (the rows
of this process's lanes, in lane order); targets equal to ``PAD_ID`` carry no loss.
"""

import concurrent.futures

import grain
import numpy as np

from moetrain.data.tokenizer import EOS_ID, PAD_ID
from moetrain.errors import ConfigError

_EVAL_ORDER_SEED = 0  # eval batches sample the whole split, the same for every train seed


def train_order(documents: grain.MapDataset, seed: int) -> grain.MapDataset:
  """The endless global document order: a fresh shuffle by ``seed`` every epoch."""
  return documents.shuffle(seed=seed).repeat(reseed_each_epoch=True)


def _inputs_and_targets(rows_RxS: np.ndarray) -> dict[str, np.ndarray]:
  return {'inputs': np.ascontiguousarray(rows_RxS[:, :-1]),
          'targets': np.ascontiguousarray(rows_RxS[:, 1:])}


def _check_lanes(lanes, lane_count: int) -> np.ndarray:
  lanes = np.asarray(lanes, np.int64)
  if (lane_count < 1 or lanes.ndim != 1 or not lanes.size or np.any(np.diff(lanes) <= 0)
      or lanes[0] < 0 or lanes[-1] >= lane_count):
    raise ValueError(f'lanes {lanes.tolist()} must be increasing rows of a batch of '
                     f'{lane_count}')
  return lanes


class LaneIterator(grain.DatasetIterator):
  """Batches of this process's lanes of ``order`` (a MapDataset of documents); see the module
  doc. A finite ``order`` pads a lane with ``PAD_ID`` once it has no document left.

  State (``get_state``/``set_state``): ``{'documents': [B], 'tokens': [B]}``, per lane the
  documents begun and the tokens of the last one used; other processes' lanes are -1.
  """

  def __init__(self, order: grain.MapDataset, tokenize, lanes, lane_count: int, seq_len: int,
               workers: int = 0):
    super().__init__()
    # Lanes are independent: with workers, their rows are cut on that many threads.
    self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
    self._order, self._tokenize = order, tokenize
    self._lanes, self._count = _check_lanes(lanes, lane_count), lane_count
    self._row_len = seq_len + 1
    self._begun = np.zeros(len(self._lanes), np.int64)
    self._used = np.zeros(len(self._lanes), np.int64)
    self._current = [np.zeros(0, np.int32) for _ in self._lanes]

  def _document(self, i: int, k: int) -> np.ndarray | None:
    """The tokens of lane i's k-th document; None when a finite order has no more."""
    position = int(self._lanes[i] + k * self._count)
    if position >= len(self._order):
      return None
    return np.asarray(list(self._tokenize(self._order[position])) + [EOS_ID], np.int32)

  def _row(self, i: int) -> np.ndarray:
    row = np.full(self._row_len, PAD_ID, np.int32)
    filled = 0
    while filled < self._row_len:
      if self._used[i] == len(self._current[i]):
        tokens = self._document(i, self._begun[i])
        if tokens is None:  # the rest of the row stays padding
          break
        self._current[i], self._begun[i], self._used[i] = tokens, self._begun[i] + 1, 0
      take = min(self._row_len - filled, len(self._current[i]) - self._used[i])
      row[filled:filled + take] = self._current[i][self._used[i]:self._used[i] + take]
      filled += take
      self._used[i] += take
    return row

  def __next__(self) -> dict[str, np.ndarray]:
    lanes = range(len(self._lanes))
    made = self._pool.map(self._row, lanes) if self._pool else map(self._row, lanes)
    return _inputs_and_targets(np.stack(list(made)))

  def get_state(self) -> dict:
    documents, tokens = np.full(self._count, -1, np.int64), np.full(self._count, -1, np.int64)
    documents[self._lanes], tokens[self._lanes] = self._begun, self._used
    return {'documents': documents.tolist(), 'tokens': tokens.tolist()}

  def set_state(self, state: dict) -> None:
    documents, tokens = (np.asarray(state[key], np.int64) for key in ('documents', 'tokens'))
    if documents.shape != (self._count,) or tokens.shape != (self._count,):
      raise ConfigError(f'the checkpoint\'s data position has {documents.size} lanes: it was '
                        f'saved with train.batch_size={documents.size}, not {self._count}')
    self._begun, self._used = documents[self._lanes], tokens[self._lanes]
    if np.any(self._begun < 0) or np.any(self._used < 0):
      raise ConfigError('the checkpoint\'s data position misses some lanes of the batch')
    self._current = [self._document(i, k - 1) if k else np.zeros(0, np.int32)
                     for i, k in enumerate(self._begun)]

  def close(self) -> None:
    if self._pool:
      self._pool.shutdown()
    super().close()


class _Lanes(grain.IterDataset):
  """``LaneIterator`` as a dataset, so that grain can prefetch it on a thread."""

  def __init__(self, *args):
    super().__init__()
    self._args = args

  def __iter__(self) -> LaneIterator:
    return LaneIterator(*self._args)


def train_batches(documents: grain.MapDataset, tokenize, seq_len: int, batch_size: int,
                  seed: int, lanes, workers: int = 2) -> grain.DatasetIterator:
  """Endless training batches of ``lanes`` (rows of the global batch of ``batch_size``);
  checkpointable (``get_state``). With ``workers`` > 0 they are made ahead of the training
  step, on that many threads."""
  batches = _Lanes(train_order(documents, seed), tokenize, lanes, batch_size, seq_len, workers)
  if workers:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)
  return iter(batches)


def eval_batches(documents: grain.MapDataset, tokenize, seq_len: int, batch_size: int,
                 num_batches: int, lanes) -> list[dict[str, np.ndarray]]:
  """``num_batches`` fixed batches of ``lanes``, packed as in training from one shuffle of
  the split; a short split leaves ``PAD_ID`` rows, which the loss ignores."""
  if num_batches < 1:
    raise ValueError(f'num_batches must be positive, got {num_batches}')
  iterator = LaneIterator(documents.shuffle(seed=_EVAL_ORDER_SEED), tokenize, lanes,
                          batch_size, seq_len)
  return [next(iterator) for _ in range(num_batches)]


def merge_positions(states) -> dict:
  """One global position from the ``get_state`` of every process (each holds its lanes)."""
  return {key: np.max([state[key] for state in states], axis=0).tolist()
          for key in ('documents', 'tokens')}
