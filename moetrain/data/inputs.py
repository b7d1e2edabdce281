"""A run's inputs from its config: the tokenizer, the training batch iterator with its
checkpointed position, and fixed eval batches."""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from moetrain.data import documents, pipeline
from moetrain.data import tokenizer as tokenizer_lib
from moetrain.errors import ConfigError


def _lead_log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def load_tokenizer(config, train_documents=None):
  """The tokenizer `data.tokenizer` names, or the one trained (once, cached) on the corpus
  (on `train_documents` when given, the opened train split of a document source)."""
  if config.data.tokenizer:
    try:
      tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
    except (OSError, RuntimeError, ValueError) as error:
      raise ConfigError(f'data.tokenizer={config.data.tokenizer!r}: {error}') from error
  elif config.data.source == 'stdlib':
    tokenizer = tokenizer_lib.load_or_train_stdlib_tokenizer(config.model.vocab_size,
                                                         log=_lead_log)
  else:
    if train_documents is None:
      train_documents = documents.documents_from_config(config.data, 'train')
    tokenizer = tokenizer_lib.load_or_train_tokenizer(train_documents, config.data,
                                                      config.model.vocab_size, log=_lead_log)
  if tokenizer.vocab_size() > config.model.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({tokenizer.vocab_size()})')
  return tokenizer


def describe(config, tokenizer, train_count: int, eval_count: int | None) -> list[str]:
  """Two summary lines: where the documents come from with their counts (eval: None when
  the run does not evaluate), and the tokenizer."""
  d = config.data
  source = {'stdlib': "the Python standard library's .py files (the embedded corpus)",
            'tfds': f'TFDS {d.tfds_name} (splits {d.split} / {d.eval_split}'
                    + (f', data_dir {d.data_dir}' if d.data_dir else '') + ')'
            }.get(d.source, f'{d.source} {d.path} (field {d.text_field!r})')
  made = (f'data.tokenizer={d.tokenizer}' if d.tokenizer
          else 'trained on the train split once, cached')
  evals = 'no eval' if eval_count is None else f'{eval_count:,} eval documents'
  return [f'data: {source}: {train_count:,} train documents, {evals}',
          f'tokenizer: sentencepiece, {tokenizer.vocab_size():,} pieces ({made})']


def load_data(config, lanes, progress=None):
  """(tokenizer, the training batch iterator of `lanes` (this process's rows of the global
  batch) resumed at `progress` (a checkpoint's data position), its fixed eval batches, the
  `describe` lines)."""
  t, progress = config.train, progress or {}
  if progress.keys() - {'step', 'data'}:
    raise ConfigError(f'the checkpoint\'s data position ({", ".join(sorted(progress))}) is '
                      'from an older moetrain; start a new run from its weights with '
                      'init.from_checkpoint')
  train_documents = documents.documents_from_config(config.data, 'train')
  eval_documents = (documents.documents_from_config(config.data, 'eval') if t.eval_every
                    else None)
  tokenizer = load_tokenizer(config, train_documents)
  eval_batches = pipeline.eval_batches(
      eval_documents, tokenizer.encode, t.seq_len, t.batch_size, t.eval_batches,
      lanes) if t.eval_every else []
  train_iter = pipeline.train_batches(train_documents, tokenizer.encode, t.seq_len,
                                      t.batch_size, t.seed, lanes, config.data.workers)
  if 'data' in progress:
    train_iter.set_state(progress['data'])
  return (tokenizer, train_iter, eval_batches,
          describe(config, tokenizer, len(train_documents),
                   None if eval_documents is None else len(eval_documents)))


def fixed_batches(config, tokenizer, split: str, num_batches: int, lanes) -> list:
  """`num_batches` fixed batches of `split` (train | eval), the rows `lanes` of each."""
  t = config.train
  return pipeline.eval_batches(documents.documents_from_config(config.data, split),
                               tokenizer.encode, t.seq_len, t.batch_size, num_batches, lanes)


def data_position(train_iter) -> dict:
  """The checkpointed data position: per lane of the global batch, the documents begun and the
  tokens of the last one used (`pipeline`), gathered from every process."""
  state = train_iter.get_state()
  if jax.process_count() > 1:
    lanes = np.stack([state['documents'], state['tokens']])
    state = pipeline.merge_positions(
        [{'documents': row[0], 'tokens': row[1]}
         for row in multihost_utils.process_allgather(lanes)])
  return {'data': state}
