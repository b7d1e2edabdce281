"""Lane packing: global batches that do not depend on the process count, and a global
position that resumes on any process count."""

import grain
import numpy as np
import pytest

from moetrain.data import pipeline
from moetrain.data.tokenizer import EOS_ID, PAD_ID
from moetrain.errors import ConfigError


def tokenize(text):
  """A stand-in tokenizer: a document is its token ids written out, space-separated."""
  return [int(word) for word in text.split()]


def corpus(count=40):
  """Documents of 1–30 tokens; document i holds only ids 1000·(i + 1) + j, so every token
  names its document."""
  lengths = np.random.default_rng(0).integers(1, 31, count)
  return grain.MapDataset.source(
      [' '.join(str(1000 * (i + 1) + j) for j in range(n)) for i, n in enumerate(lengths)])


def batches(lanes, steps, state=None, documents=None, workers=0, batch_size=8):
  iterator = pipeline.train_batches(documents or corpus(), tokenize, 16, batch_size, seed=3,
                                    lanes=lanes, workers=workers)
  if state is not None:
    iterator.set_state(state)
  return iterator, [next(iterator) for _ in range(steps)]


def rows(batch):
  """[rows, seq_len + 1]: the packed rows a batch was cut from."""
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  return np.concatenate([batch['inputs'], batch['targets'][:, -1:]], axis=1)


@pytest.mark.parametrize('split', [[range(4), range(4, 8)], [range(0, 8, 2), range(1, 8, 2)],
                                   [range(2), range(2, 4), range(4, 6), range(6, 8)]],
                         ids=['two-blocks', 'two-interleaved', 'four-blocks'])
def test_the_global_batches_do_not_depend_on_how_the_lanes_split_over_processes(split):
  _, whole = batches(range(8), 12)
  shares = [batches(lanes, 12)[1] for lanes in split]
  for step, batch in enumerate(whole):
    for lanes, share in zip(split, shares):
      np.testing.assert_array_equal(share[step]['inputs'], batch['inputs'][list(lanes)])
      np.testing.assert_array_equal(share[step]['targets'], batch['targets'][list(lanes)])


def test_a_lane_cuts_its_documents_in_order_and_the_lanes_read_each_document_once():
  documents = corpus()
  _, drawn = batches(range(8), 30)
  order = pipeline.train_order(documents, seed=3)
  for lane in range(8):
    stream = np.concatenate([rows(batch)[lane] for batch in drawn])
    expected = np.concatenate([tokenize(order[lane + 8 * k]) + [EOS_ID] for k in range(60)])
    np.testing.assert_array_equal(stream, expected[:stream.size])
  # Lane j reads positions j, j + 8, …: one epoch's 40 positions go to 8 lanes, 5 each,
  # and hold each document once.
  epoch = [order[lane + 8 * k] for lane in range(8) for k in range(5)]
  assert sorted(epoch) == sorted(documents[i] for i in range(len(documents)))
  assert PAD_ID not in np.concatenate([rows(batch) for batch in drawn])


@pytest.mark.parametrize('saved_on, resumed_on', [(2, 1), (1, 2), (4, 2)])
def test_a_position_saved_on_n_processes_resumes_on_m_with_the_same_batches(saved_on,
                                                                           resumed_on):
  _, uninterrupted = batches(range(8), 14)
  blocks = lambda n: [range(p * 8 // n, (p + 1) * 8 // n) for p in range(n)]
  savers = [batches(lanes, 9)[0] for lanes in blocks(saved_on)]  # past an epoch's end
  position = pipeline.merge_positions([saver.get_state() for saver in savers])
  resumed = [batches(lanes, 5, state=position)[1] for lanes in blocks(resumed_on)]
  for step in range(5):
    np.testing.assert_array_equal(
        np.concatenate([share[step]['inputs'] for share in resumed]),
        uninterrupted[9 + step]['inputs'])


def test_prefetching_threads_give_the_same_batches_and_position():
  plain, expected = batches(range(8), 6)
  threaded, got = batches(range(8), 6, workers=3)
  for want, batch in zip(expected, got):
    np.testing.assert_array_equal(batch['inputs'], want['inputs'])
  assert threaded.get_state() == plain.get_state()


def test_a_position_for_another_batch_size_is_refused():
  saved, _ = batches(range(8), 2)
  with pytest.raises(ConfigError, match=r'train\.batch_size=8, not 4'):
    batches(range(4), 1, state=saved.get_state(), batch_size=4)


def test_eval_batches_are_fixed_and_split_like_training_batches():
  documents = corpus()
  whole = pipeline.eval_batches(documents, tokenize, 16, 8, 3, range(8))
  assert whole[0]['inputs'].shape == (8, 16) and len(whole) == 3
  halves = [pipeline.eval_batches(documents, tokenize, 16, 8, 3, lanes)
            for lanes in (range(4), range(4, 8))]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([half[step]['inputs'] for half in halves]), batch['inputs'])


def test_eval_batches_of_a_short_split_end_in_padding():
  short = grain.MapDataset.source([corpus()[i] for i in range(3)])
  drawn = pipeline.eval_batches(short, tokenize, 16, 8, 3, range(8))
  real = [int((batch['targets'] != PAD_ID).sum()) for batch in drawn]
  assert real[0] > 0 and real[-1] == 0
  assert np.all(drawn[0]['targets'][3:] == PAD_ID)  # lanes 3…7 have no document
