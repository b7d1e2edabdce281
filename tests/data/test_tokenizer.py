import pathlib

import pytest
import sentencepiece as spm

from moetrain.data import sources, tokenizer
from moetrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from moetrain.errors import ConfigError

# Lossless on whitespace and non-ASCII. "\r" is kept too (as a byte piece),
# although read_text normalises the line endings of corpus files to "\n".
TRICKY = [
    'naïve 日本語 🙂\n\tx = 1',
    'def f():\n\tif x:\n\t\treturn  1  \n',
    '        deeply    spaced     text   \n\n\n   ',
    ' leading space',
    'trailing spaces   ',
    'windows\r\nline\rendings\r\n',
    '',
]


@pytest.fixture(scope='module')
def stdlib_tok():
  # The real user cache on purpose: trained once, shared with `make train`.
  return tokenizer.load_or_train_stdlib_tokenizer(8000)


def test_stdlib_tokenizer_round_trips_files(stdlib_tok):
  files = sources.stdlib_files('train')
  sample = files[:: max(1, len(files) // 20)] + sources.stdlib_files('eval')[:2]
  for path in sample:
    text = sources.read_text(path)
    ids = stdlib_tok.encode(text)
    assert stdlib_tok.decode(ids) == text, path
    assert UNK_ID not in ids


@pytest.mark.parametrize('text', TRICKY)
def test_stdlib_tokenizer_round_trips_tricky_strings(stdlib_tok, text):
  ids = stdlib_tok.encode(text)
  assert stdlib_tok.decode(ids) == text
  assert UNK_ID not in ids


def test_special_ids(stdlib_tok):
  assert stdlib_tok.vocab_size() == 8000
  special = (stdlib_tok.pad_id(), stdlib_tok.unk_id(), stdlib_tok.bos_id(), stdlib_tok.eos_id())
  assert special == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
  assert stdlib_tok.id_to_piece(EOS_ID) == '</s>'
  # Encoding text never emits the special ids themselves.
  assert not {PAD_ID, BOS_ID, EOS_ID} & set(stdlib_tok.encode(TRICKY[0] + TRICKY[1]))


def test_second_load_uses_cache(stdlib_tok, monkeypatch):
  path = tokenizer.stdlib_tokenizer_path(8000)
  assert path.is_file() and path.parent == tokenizer.cache_dir() / 'tokenizers'
  mtime = path.stat().st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError('retrained instead of loading from cache')

  monkeypatch.setattr(tokenizer, 'train_tokenizer', no_training)
  again = tokenizer.load_or_train_stdlib_tokenizer(8000)
  assert again.serialized_model_proto() == stdlib_tok.serialized_model_proto()
  assert path.stat().st_mtime_ns == mtime


def test_cache_key_depends_on_vocab():
  assert tokenizer.stdlib_tokenizer_path(8000) != tokenizer.stdlib_tokenizer_path(4000)
  assert 'stdlib-bpe-4000-' in tokenizer.stdlib_tokenizer_path(4000).name


def test_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.setenv('MOETRAIN_CACHE', str(tmp_path / 'explicit'))
  assert tokenizer.cache_dir() == tmp_path / 'explicit'
  monkeypatch.delenv('MOETRAIN_CACHE')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert tokenizer.cache_dir() == tmp_path / 'xdg' / 'moetrain'
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert tokenizer.cache_dir() == pathlib.Path.home() / '.cache' / 'moetrain'


def test_small_tokenizer_trains_deterministically_and_round_trips(tmp_path):
  texts = [sources.read_text(p) for p in sources.stdlib_files('eval')[:3]]
  first, second = tmp_path / 'a' / 'small.model', tmp_path / 'b' / 'small.model'
  tokenizer.train_tokenizer(texts, 400, first)
  tokenizer.train_tokenizer(iter(texts), 400, second)
  assert first.read_bytes() == second.read_bytes()
  # Only the finished model is left behind, no temp files.
  assert [p.name for p in first.parent.iterdir()] == ['small.model']

  small = tokenizer.load_tokenizer(first)
  assert small.vocab_size() == 400
  for text in texts + TRICKY:
    assert small.decode(small.encode(text)) == text


def test_load_tokenizer_missing_file(tmp_path):
  missing = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer.load_tokenizer(missing)


def test_load_tokenizer_rejects_other_special_ids(tmp_path):
  # SentencePiece's own defaults (unk=0, bos=1, eos=2, no pad) would make the
  # loss mask real tokens.
  texts = [sources.read_text(p) for p in sources.stdlib_files('eval')[:3]]
  path = tmp_path / 'default_ids.model'
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[0].split('\n')),
                                 model_prefix=str(path.with_suffix('')), vocab_size=200,
                                 minloglevel=2)
  with pytest.raises(ValueError, match='pad_id=-1'):
    tokenizer.load_tokenizer(path)


def test_a_vocab_size_below_what_the_corpus_needs_names_model_vocab_size(monkeypatch, tmp_path):
  monkeypatch.setenv('MOETRAIN_CACHE', str(tmp_path))
  lines = []
  with pytest.raises(ConfigError) as error:
    tokenizer.load_or_train_stdlib_tokenizer(100, log=lines.append)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('model.vocab_size=100 is too small for a tokenizer of the embedded '
                            'corpus')
  minimum = int(message.rsplit('model.vocab_size >= ', 1)[1])
  assert 256 < minimum < 1000
  # One progress line before the training, naming the size and the cache.
  assert len(lines) == 1 and 'of 100 tokens on the embedded corpus' in lines[0]
  assert str(tmp_path / 'tokenizers') in lines[0]
  assert not list(tmp_path.rglob('*.model'))


def test_a_vocab_size_above_what_the_texts_hold_names_the_maximum(tmp_path):
  texts = [sources.read_text(p) for p in sources.stdlib_files('eval')[:3]]
  with pytest.raises(RuntimeError) as error:
    tokenizer.train_tokenizer(texts, 100_000, tmp_path / 'big.model')
  message = str(tokenizer.vocab_size_error(error.value, 100_000, 'three files'))
  maximum = int(message.split('model.vocab_size <= ')[1].split()[0])
  assert message == (f'model.vocab_size=100000 is too large for a tokenizer of three files: '
                     f'SentencePiece learns at most {maximum:,} tokens from it; set '
                     f'model.vocab_size <= {maximum} or give data.tokenizer')
  tokenizer.train_tokenizer(texts, maximum, tmp_path / 'largest.model')  # the bound is exact
  assert not (tmp_path / 'big.model').exists()


def test_an_unknown_sentencepiece_failure_keeps_its_last_line():
  error = RuntimeError('INTERNAL: src/x.cc(1) [a == b]\nsomething odd')
  assert str(tokenizer.vocab_size_error(error, 500, 'a corpus')) == (
      'model.vocab_size=500: SentencePiece cannot train a tokenizer of that size on a corpus '
      '(something odd); change model.vocab_size or give data.tokenizer')


def test_an_interrupted_write_leaves_neither_model_nor_temp_file(monkeypatch, tmp_path):
  def interrupted(fd):
    raise KeyboardInterrupt
  monkeypatch.setattr(tokenizer.os, 'fsync', interrupted)
  with pytest.raises(KeyboardInterrupt):
    tokenizer.atomic_write_bytes(tmp_path / 'tok.model', b'half')
  assert list(tmp_path.iterdir()) == []
