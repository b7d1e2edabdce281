"""A run's inputs from its config: the tokenizer, the training batch iterator with its
checkpointed position, and fixed eval batches."""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from moetrain.data import documents, pipeline, sources
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


def load_data(config, process_index: int, process_count: int, progress=None):
  """(tokenizer, this process's training batch iterator resumed at `progress` (a checkpoint's
  data position), its fixed eval batches, the `describe` lines)."""
  t, progress = config.train, progress or {}
  if config.data.source == 'stdlib':
    tokenizer = load_tokenizer(config)
    counts = (len(sources.stdlib_files('train')),
              len(sources.stdlib_files('eval')) if t.eval_every else None)
    eval_batches = fixed_batches(config, tokenizer, 'eval', t.eval_batches, process_index,
                                 process_count) if t.eval_every else []
    train_rows = pipeline.pack(pipeline.tokenized_stdlib('train', tokenizer), t.seq_len)
    train_iter = pipeline.train_batches(train_rows, t.batch_size, t.seed, process_index,
                                        process_count, start_row=progress.get('data_rows', 0))
    return tokenizer, train_iter, eval_batches, describe(config, tokenizer, *counts)
  train_documents = documents.documents_from_config(config.data, 'train')
  eval_documents = (documents.documents_from_config(config.data, 'eval') if t.eval_every
                    else None)
  tokenizer = load_tokenizer(config, train_documents)
  eval_batches = pipeline.document_eval_batches(
      eval_documents, tokenizer, t.seq_len, t.batch_size, t.eval_batches, process_index,
      process_count) if t.eval_every else []
  train_iter = pipeline.document_train_batches(
      train_documents, tokenizer, t.seq_len, t.batch_size, t.seed, process_index,
      process_count, config.data.workers)
  if 'data_states' in progress:
    states = progress['data_states']
    if len(states) != process_count:
      raise ConfigError(f'the checkpoint\'s data position was saved by {len(states)} '
                        f'processes; resume data.source={config.data.source} with as many '
                        f'(here: {process_count})')
    train_iter.set_state(states[process_index])
  return (tokenizer, train_iter, eval_batches,
          describe(config, tokenizer, len(train_documents),
                   None if eval_documents is None else len(eval_documents)))


def fixed_batches(config, tokenizer, split: str, num_batches: int, process_index: int = 0,
                  process_count: int = 1) -> list:
  """`num_batches` fixed batches spread over `split` (train | eval), this process's share."""
  t = config.train
  if config.data.source == 'stdlib':
    rows = pipeline.pack(pipeline.tokenized_stdlib(split, tokenizer), t.seq_len)
    return pipeline.eval_batches(rows, t.batch_size, num_batches, process_index, process_count)
  return pipeline.document_eval_batches(
      documents.documents_from_config(config.data, split), tokenizer, t.seq_len, t.batch_size,
      num_batches, process_index, process_count)


def data_position(config, train_iter, start_rows: int, steps_done: int) -> dict:
  """The checkpointed data position after `steps_done` steps of this run (see load_data)."""
  if config.data.source == 'stdlib':
    return {'data_rows': start_rows + steps_done * config.train.batch_size}
  state = json.dumps(train_iter.get_state())
  if jax.process_count() == 1:
    return {'data_states': [json.loads(state)]}
  # Every process's iterator state goes into the one JSON item process 0 writes.
  encoded = np.frombuffer(state.encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.int32(len(encoded)))))
  padded = np.zeros(longest, np.uint8)
  padded[:len(encoded)] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return {'data_states': [json.loads(bytes(row).rstrip(b'\0')) for row in gathered]}
