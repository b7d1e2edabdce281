"""Token streams, packing into training rows, and grain batch iterators.

A batch is ``{'inputs': int32 [b, seq_len], 'targets': int32 [b, seq_len]}``;
targets equal to ``PAD_ID`` carry no loss (the trainer masks them).
"""

import hashlib
import io
import itertools
import json
import pathlib

import grain
import numpy as np
import sentencepiece as spm

from moetrain.data import sources
from moetrain.data.tokenizer import EOS_ID, PAD_ID, atomic_write_bytes, cache_dir


def _corpus_cache_path(split: str, tokenizer: spm.SentencePieceProcessor
                       ) -> tuple[list[pathlib.Path], pathlib.Path]:
  files = sources.stdlib_files(split)
  key_material = json.dumps({
      'split': split,
      'files': [[sources.relative_name(p), p.stat().st_size] for p in files],
      'tokenizer': hashlib.sha1(tokenizer.serialized_model_proto()).hexdigest(),
  })
  key = hashlib.sha1(key_material.encode('utf-8')).hexdigest()[:12]
  return files, cache_dir() / 'corpus' / f'stdlib-{split}-{key}.npy'


def tokenized_stdlib(split: str, tokenizer: spm.SentencePieceProcessor) -> np.ndarray:
  """The stdlib split as one int32 token stream ``[num_tokens]``, cached on disk.

  Each file is encoded whole and followed by ``EOS_ID``, in ``stdlib_files``
  order.
  """
  files, path = _corpus_cache_path(split, tokenizer)
  if path.is_file():
    return np.load(path)
  # Batch encoding runs on SentencePiece's own threads.
  encoded = tokenizer.encode([sources.read_text(p) for p in files])
  lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
  stream = np.full(int(lengths.sum()), EOS_ID, dtype=np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for start, ids in zip(starts, encoded):
    stream[start:start + len(ids)] = ids
  buffer = io.BytesIO()
  np.save(buffer, stream)
  atomic_write_bytes(path, buffer.getvalue())
  return stream


def pack(stream: np.ndarray, seq_len: int, pad_id: int = PAD_ID) -> np.ndarray:
  """Cut a token stream ``[N]`` into rows ``[num_rows, seq_len + 1]`` (int32).

  Row i is ``stream[i*seq_len : i*seq_len + seq_len + 1]``; inputs are
  ``row[:-1]`` and targets ``row[1:]``. Consecutive rows overlap by exactly one
  token (the last target of a row is the first input of the next), so every
  token that has a successor is an input exactly once and every token but the
  first is a target exactly once. Only the last row is right-padded with
  ``pad_id``; rows without any real target are not produced.
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  stream = np.asarray(stream, dtype=np.int32).reshape(-1)
  num_rows = max(0, -(-(stream.size - 1) // seq_len))
  padded = np.full(num_rows * seq_len + 1, pad_id, dtype=np.int32)
  padded[:stream.size] = stream[:padded.size]
  rows = np.empty((num_rows, seq_len + 1), dtype=np.int32)
  rows[:, :seq_len] = padded[:-1].reshape(num_rows, seq_len)
  rows[:, seq_len] = padded[seq_len::seq_len]
  return rows


def _inputs_and_targets(rows: np.ndarray) -> dict[str, np.ndarray]:
  return {'inputs': np.ascontiguousarray(rows[:, :-1]),
          'targets': np.ascontiguousarray(rows[:, 1:])}


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process_index {process_index} for process_count {process_count}')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'global batch_size {batch_size} must be a positive multiple of '
                     f'process_count {process_count}')
  return batch_size // process_count


def train_batches(rows: np.ndarray, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, start_row: int = 0) -> grain.DatasetIterator:
  """Endless shuffled batches of ``rows`` ``[R, seq_len + 1]`` for this process.

  ``batch_size`` is global. All processes share one global row order (a new
  shuffle every epoch, determined by ``seed``); global batch s is positions
  ``[s*batch_size, (s+1)*batch_size)`` of it, and this process takes every
  ``process_count``-th position from ``process_index``, so the processes'
  local batches ``[batch_size // process_count, seq_len]`` at one step are a
  partition of the global batch. ``start_row`` skips that many positions of the
  global order: the position a checkpoint saves, valid for any process count.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  if len(rows) == 0:
    raise ValueError('cannot draw training batches from zero rows')
  dataset = (
      grain.MapDataset.source(np.asarray(rows, dtype=np.int32))
      .shuffle(seed=seed)
      # Reseeding makes each epoch a fresh permutation, still a pure function of seed.
      .repeat(reseed_each_epoch=True)
      .slice(slice(start_row + process_index, None, process_count))
      .batch(local, drop_remainder=True)
      .map(_inputs_and_targets))
  # Rows are already in memory, so a batch is a gather and a copy; worker
  # threads and prefetching only cost time here.
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(rows: np.ndarray, batch_size: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """``num_batches`` global batches of rows spread evenly over ``rows``, this process's share.

  The rows are taken at even strides, in order, so a few batches sample every
  part of the split instead of only its first files. Uses the same per-process
  split of each global batch as ``train_batches``. With fewer rows, fewer
  batches (at least one) holding every row: the last global batch is completed
  with rows made only of ``PAD_ID``, which the loss ignores. Every process gets
  the same number of batches.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  if num_batches < 1:
    raise ValueError(f'num_batches must be positive, got {num_batches}')
  rows = np.asarray(rows, dtype=np.int32)
  count = max(1, min(num_batches, -(-len(rows) // batch_size)))
  padded = np.full((count * batch_size, rows.shape[1]), PAD_ID, dtype=np.int32)
  wanted = count * batch_size
  taken = (rows[np.linspace(0, len(rows), wanted, endpoint=False).astype(np.int64)]
           if len(rows) > wanted else rows)
  padded[:len(taken)] = taken
  mine = padded[process_index::process_count]
  return [_inputs_and_targets(mine[i * local:(i + 1) * local]) for i in range(count)]


def _rows_of_documents(documents: grain.MapDataset, tokenizer, seq_len: int,
                       read_options: grain.ReadOptions) -> grain.IterDataset:
  """Documents (strings) → rows ``{'tokens': int32 [seq_len + 1]}``: each document tokenized
  and ended by ``EOS_ID``, concatenated and cut (grain's concat-then-split packing: every token
  lands in exactly one row)."""
  def tokenize(text):
    return {'tokens': np.asarray(tokenizer.encode(text) + [EOS_ID], np.int32)}
  rows = grain.experimental.ConcatThenSplitIterDataset(
      documents.map(tokenize).to_iter_dataset(read_options),
      length_struct={'tokens': seq_len + 1})
  # Document boundaries are re-derived from EOS_ID inside the model step (data.packing).
  return rows.map(lambda row: row['tokens'])


def process_documents(documents: grain.MapDataset, seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
  """This process's endless share of the documents: positions p, p + n, … of one global order
  that is a fresh shuffle by ``seed`` every epoch (n processes)."""
  return (documents.shuffle(seed=seed).repeat(reseed_each_epoch=True)
          .slice(slice(process_index, None, process_count)))


def document_train_batches(documents: grain.MapDataset, tokenizer, seq_len: int,
                           batch_size: int, seed: int, process_index: int = 0,
                           process_count: int = 1, workers: int = 2) -> grain.DatasetIterator:
  """Endless batches of packed documents for this process; checkpointable (`get_state`).

  One global document order per epoch (a shuffle by ``seed``, fresh each epoch); process p
  reads documents p, p + n, p + 2n, … of it (n processes), so the processes' shares are
  disjoint and together cover each epoch. Each packs its own documents into rows, tokenizing
  on ``workers`` threads ahead of the training step. ``batch_size`` is global.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  mine = process_documents(documents, seed, process_index, process_count)
  options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(4 * workers, 8))
  rows = _rows_of_documents(mine, tokenizer, seq_len, options)
  return iter(rows.batch(local, drop_remainder=True).map(_inputs_and_targets))


def document_eval_batches(documents: grain.MapDataset, tokenizer, seq_len: int,
                          batch_size: int, num_batches: int, process_index: int = 0,
                          process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """``num_batches`` fixed batches of the eval documents, this process's share (its documents,
  packed as in training). A short split is completed with ``PAD_ID`` rows, which the loss
  ignores, so that every process runs the same number of eval steps."""
  local = _local_batch_size(batch_size, process_index, process_count)
  mine = documents.slice(slice(process_index, None, process_count))
  rows = list(itertools.islice(iter(_rows_of_documents(
      mine, tokenizer, seq_len, grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))),
      num_batches * local))
  padded = np.full((num_batches * local, seq_len + 1), PAD_ID, np.int32)
  if rows:
    padded[:len(rows)] = np.stack(rows)
  return [_inputs_and_targets(padded[i * local:(i + 1) * local]) for i in range(num_batches)]
