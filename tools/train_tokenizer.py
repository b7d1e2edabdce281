"""Trains a sentencepiece tokenizer on a data source, for `--config.data.tokenizer=FILE`.

  python tools/train_tokenizer.py --config configs/tiny.py --output tok.model \\
      [--vocab_size N] [--model_type bpe|unigram] [--max_documents N] \\
      [--config.data.source=jsonl --config.data.path=corpus/*.jsonl …]

Reads the train split of the config's `data` section (any source: the embedded corpus, text,
jsonl, parquet, TFDS), trains with byte fallback so every text round-trips exactly, checks
that round trip on documents it did not train on, and writes the model atomically. Bad input
prints one line and exits with status 2.
"""

import pathlib
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moetrain.errors import ConfigError  # noqa: E402


def _documents(config, split):
  """The config's documents of `split` as a grain MapDataset of strings."""
  import grain
  from moetrain.data import documents, sources
  if config.data.source == 'stdlib':
    return grain.MapDataset.source(
        [sources.read_text(path) for path in sources.stdlib_files(split)])
  return documents.documents_from_config(config.data, split)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from moetrain import config as config_lib
  parser = config_lib.ArgumentParser(prog='train_tokenizer', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='a configs/*.py file (its data section)')
  parser.add_argument('--output', required=True, help='the .model file to write')
  parser.add_argument('--vocab_size', type=int, help='pieces (default: model.vocab_size)')
  parser.add_argument('--model_type', choices=('bpe', 'unigram'), default='bpe')
  parser.add_argument('--max_documents', type=int, default=100_000,
                      help='train on at most this many documents, in a fixed random order')
  try:
    args, overrides = config_lib.parse_with_overrides(parser, argv)
    from moetrain.data import tokenizer as tokenizer_lib
    config = config_lib.load(args.config, overrides)
    vocab_size = args.vocab_size or config.model.vocab_size
    train = _documents(config, 'train').shuffle(seed=0)
    count = min(len(train), args.max_documents)
    print(f'training a {vocab_size}-piece {args.model_type} model on {count} documents')
    try:
      tokenizer_lib.train_tokenizer((train[i] for i in range(count)), vocab_size,
                                    pathlib.Path(args.output), args.model_type)
    except RuntimeError as error:
      raise ConfigError(f'sentencepiece: {str(error).strip().splitlines()[-1]}') from error
    tokenizer = tokenizer_lib.load_tokenizer(pathlib.Path(args.output))
    held_out = _documents(config, 'eval')
    checked = [held_out[i] for i in range(min(len(held_out), 200))]
    exact = sum(tokenizer.decode(tokenizer.encode(text)) == text for text in checked)
    tokens = sum(len(tokenizer.encode(text)) for text in checked)
    chars = sum(len(text) for text in checked)
    print(f'wrote {args.output}: {exact}/{len(checked)} held-out documents round-trip exactly, '
          f'{chars / max(tokens, 1):.2f} characters per token')
  except ConfigError as error:
    print(f'train_tokenizer: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
