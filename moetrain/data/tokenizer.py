"""SentencePiece BPE tokenizer for source code, trained on first use and cached.

The settings make encoding lossless: ``decode(encode(text)) == text`` for any
string, including indentation, tabs, newlines, "\\r" and non-ASCII text (rare
characters fall back to their UTF-8 bytes).
"""

import hashlib
import io
import json
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator

import sentencepiece as spm

from moetrain import paths
from moetrain.data import sources
from moetrain.errors import ConfigError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3  # ends every document

# Everything that shapes the trained model except the texts and vocab size; it
# is part of the cache key so a settings change never reuses a stale model.
_TRAINER_SETTINGS = dict(
    model_type='bpe',
    # Identity normalisation and no whitespace clean-up: code must round-trip
    # byte for byte, and indentation is meaningful.
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    # Newlines and tabs are always one piece each; this is also what lets the
    # model, trained on single lines, encode multi-line text exactly.
    user_defined_symbols=['\n', '\t'],
    # Numbers are learned digit by digit instead of spending vocab on literals.
    split_digits=True,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    # Every line is used, in the given order: no sampling means no randomness,
    # so the same texts always give the same model. (The learned pieces do not
    # depend on the thread count; the count is fixed so the file bytes do not
    # either.)
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=2,
    minloglevel=1)


def cache_dir() -> pathlib.Path:
  """Root of moetrain's caches: ``$MOETRAIN_CACHE``, else the user cache dir."""
  explicit = os.environ.get('MOETRAIN_CACHE')
  if explicit:
    return pathlib.Path(explicit)
  xdg = os.environ.get('XDG_CACHE_HOME')
  base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / '.cache'
  return base / 'moetrain'


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to ``path`` so readers see the old file or the whole new one.

  Concurrent writers (several processes of one job) each rename their own
  complete temp file into place, and a killed writer leaves only a temp file.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file private (0600); the cache may be shared by users.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _lines(texts: Iterable[str]) -> Iterator[str]:
  # SentencePiece skips sentences longer than max_sentence_length, so whole
  # files would be dropped; lines are short and "\n" is a user symbol anyway.
  for text in texts:
    for line in text.split('\n'):
      if line:
        yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: pathlib.Path,
                    model_type: str = 'bpe') -> None:
  """Train a ``model_type`` (bpe | unigram) model of exactly ``vocab_size`` pieces on
  ``texts``, with byte fallback (every text round-trips exactly); write it to ``model_path``.

  Deterministic: the same texts and vocab size give the same model file.
  Raises ``RuntimeError`` (from SentencePiece) if the texts are too small to
  fill the vocabulary.
  """
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=_lines(texts), model_writer=buffer,
                                 vocab_size=vocab_size,
                                 **{**_TRAINER_SETTINGS, 'model_type': model_type})
  atomic_write_bytes(model_path, buffer.getvalue())


def load_tokenizer(path: pathlib.Path) -> spm.SentencePieceProcessor:
  """Load a SentencePiece ``.model`` file.

  Raises ``FileNotFoundError`` if it is missing and ``ValueError`` if its pad or
  end-of-document ids differ from ``PAD_ID``/``EOS_ID``, which the pipeline
  writes and the loss masks by value.
  """
  path = paths.resolve(path)  # local, or a URL such as gs://bucket/tokenizer.model
  if not path.is_file():
    raise FileNotFoundError(f'tokenizer model not found: {path}')
  processor = spm.SentencePieceProcessor(model_proto=path.read_bytes())
  if (processor.pad_id(), processor.eos_id()) != (PAD_ID, EOS_ID):
    raise ValueError(f'tokenizer {path} has pad_id={processor.pad_id()} and '
                     f'eos_id={processor.eos_id()}; moetrain needs pad_id={PAD_ID} and '
                     f'eos_id={EOS_ID}')
  return processor


def stdlib_tokenizer_path(vocab_size: int) -> pathlib.Path:
  """Cache path of the stdlib tokenizer for this Python's stdlib and these settings."""
  files = sources.stdlib_files('train')
  key_material = json.dumps({
      'files': [[sources.relative_name(p), p.stat().st_size] for p in files],
      'settings': _TRAINER_SETTINGS,
      'vocab_size': vocab_size,
      'sentencepiece': spm.__version__,
  }, sort_keys=True)
  key = hashlib.sha1(key_material.encode('utf-8')).hexdigest()[:12]
  return cache_dir() / 'tokenizers' / f'stdlib-bpe-{vocab_size}-{key}.model'


# Documents a tokenizer is trained on when a run names none (a sample in a fixed order).
TRAINING_DOCUMENTS = 20_000

# SentencePiece's words for a vocabulary it cannot fill or that cannot hold every character.
_TOO_LARGE = re.compile(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)')
_TOO_SMALL = re.compile(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)')


def vocab_size_error(error: RuntimeError, vocab_size: int, corpus: str) -> ConfigError:
  """The one-line ConfigError for SentencePiece failing to train `vocab_size` pieces on
  `corpus`: it names model.vocab_size and, when SentencePiece reports one, the bound to meet."""
  text = str(error)
  if match := _TOO_SMALL.search(text):
    return ConfigError(f'model.vocab_size={vocab_size} is too small for a tokenizer of {corpus}:'
                       f' it needs at least {int(match[2]):,} tokens (its characters, the 256 '
                       f'bytes and the special tokens); set model.vocab_size >= {match[2]}')
  if match := _TOO_LARGE.search(text):
    return ConfigError(f'model.vocab_size={vocab_size} is too large for a tokenizer of {corpus}:'
                       f' SentencePiece learns at most {int(match[2]):,} tokens from it; set '
                       f'model.vocab_size <= {match[2]} or give data.tokenizer')
  detail = text.strip().splitlines()[-1].split('] ')[-1] if text.strip() else repr(error)
  return ConfigError(f'model.vocab_size={vocab_size}: SentencePiece cannot train a tokenizer of '
                     f'that size on {corpus} ({detail}); change model.vocab_size or give '
                     'data.tokenizer')


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _train_and_cache(texts, vocab_size: int, path: pathlib.Path, corpus: str,
                     log: Callable[[str], None]) -> None:
  # Training takes tens of seconds: say what is happening, once, before it starts.
  log(f'training a sentencepiece tokenizer of {vocab_size:,} tokens on {corpus}, once '
      f'(cached in {path.parent})…')
  try:
    train_tokenizer(texts, vocab_size, path)
  except RuntimeError as error:
    raise vocab_size_error(error, vocab_size, corpus) from error


def load_or_train_tokenizer(documents, data_config, vocab_size: int,
                            log: Callable[[str], None] = _stderr) -> spm.SentencePieceProcessor:
  """A BPE tokenizer of up to `TRAINING_DOCUMENTS` documents of a source (a grain MapDataset
  of strings), trained once and cached under a key of the data config and vocabulary size.
  `log` gets one progress line before a training (pass a no-op on all but one process)."""
  fields = {name: data_config[name] for name in ('source', 'path', 'text_field', 'data_dir',
                                                 'tfds_name', 'weights', 'split')}
  key = hashlib.sha1(json.dumps([fields, vocab_size, len(documents)], sort_keys=True)
                     .encode()).hexdigest()[:12]
  path = cache_dir() / 'tokenizers' / f'{data_config.source}-bpe-{vocab_size}-{key}.model'
  if not path.is_file():
    sample = documents.shuffle(seed=0)
    count = min(len(sample), TRAINING_DOCUMENTS)
    _train_and_cache((sample[i] for i in range(count)), vocab_size, path,
                     f'{count:,} documents of data.source={data_config.source}', log)
  return load_tokenizer(path)


def load_or_train_stdlib_tokenizer(vocab_size: int, log: Callable[[str], None] = _stderr
                                   ) -> spm.SentencePieceProcessor:
  """The BPE tokenizer of the stdlib train split, trained once and then loaded from cache.
  `log` gets one progress line before a training (pass a no-op on all but one process)."""
  path = stdlib_tokenizer_path(vocab_size)
  if not path.is_file():
    files = sources.stdlib_files('train')
    _train_and_cache((sources.read_text(p) for p in files), vocab_size, path,
                     f'the embedded corpus ({len(files):,} files of the Python standard library)',
                     log)
  return load_tokenizer(path)
