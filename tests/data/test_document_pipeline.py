"""Batches of packed documents: disjoint per-process shares, exact packing, resumable state."""

import grain
import numpy as np

from moetrain.data import pipeline
from moetrain.data.tokenizer import EOS_ID, PAD_ID


class DigitTokenizer:
  """A stand-in tokenizer: a document is its token ids written out, space-separated."""

  def encode(self, text):
    return [int(word) for word in text.split()]


def corpus(count=40):
  """Documents of 1–30 tokens; document i holds only ids 1000·(i + 1) + j, so every token
  names its document."""
  lengths = np.random.default_rng(0).integers(1, 31, count)
  return [' '.join(str(1000 * (i + 1) + j) for j in range(n)) for i, n in enumerate(lengths)]


def test_two_processes_read_disjoint_shares_that_cover_the_epoch():
  documents = grain.MapDataset.source(corpus())
  shares = [pipeline.process_documents(documents, 7, p, 2) for p in (0, 1)]
  epoch = [[share[i] for i in range(len(documents) // 2)] for share in shares]
  assert not set(epoch[0]) & set(epoch[1])
  assert sorted(epoch[0] + epoch[1]) == sorted(corpus())
  # The next epoch is another order of the same documents.
  second = [shares[0][i] for i in range(len(documents) // 2, len(documents))]
  assert second != epoch[0]


def test_packing_loses_and_duplicates_no_token():
  documents = grain.MapDataset.source(corpus())
  seq_len, batch = 16, 4
  iterator = pipeline.document_train_batches(documents, DigitTokenizer(), seq_len, batch * 2,
                                             seed=3, process_index=1, process_count=2)
  batches = [next(iterator) for _ in range(10)]
  rows = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1)
                         for b in batches])
  assert rows.shape == (10 * batch, seq_len + 1)
  np.testing.assert_array_equal(rows[:, 1:-1], np.concatenate(
      [b['targets'][:, :-1] for b in batches]))  # targets are inputs shifted by one
  # Rows cut one stream: this process's documents in order, each ended by EOS_ID.
  share = pipeline.process_documents(documents, 3, 1, 2)
  stream = np.concatenate([DigitTokenizer().encode(share[i]) + [EOS_ID]
                           for i in range(4 * len(documents))])
  flat = rows.reshape(-1)
  np.testing.assert_array_equal(flat, stream[:flat.size])
  assert PAD_ID not in flat


def test_iterator_state_restores_the_same_next_batches():
  documents = grain.MapDataset.source(corpus())

  def batches():
    return pipeline.document_train_batches(documents, DigitTokenizer(), 16, 4, seed=5,
                                           workers=2)
  iterator = batches()
  for _ in range(7):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = batches()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for name in ('inputs', 'targets'):
      np.testing.assert_array_equal(got[name], want[name])


def test_eval_batches_are_padded_to_the_same_count_on_every_process():
  documents = grain.MapDataset.source(corpus(5))
  shares = [pipeline.document_eval_batches(documents, DigitTokenizer(), 16, 4, 3, p, 2)
            for p in (0, 1)]
  assert [len(share) for share in shares] == [3, 3]
  assert all(b['inputs'].shape == (2, 16) for share in shares for b in share)
  real = [int((b['targets'] != PAD_ID).sum()) for share in shares for b in share]
  assert sum(real) > 0 and real[-1] == 0  # the split is short: the last batches are padding
