"""Build a TFDS dataset (array_record; splits train and eval) from text, jsonl or parquet files.

  python tools/prepare_dataset.py --name NAME --data_dir DIR
      (--text FILES | --jsonl FILES | --parquet FILES) [--text_field text] [--eval_per_mille 50]

FILES are comma-separated paths, directories or glob patterns (quote the globs). Documents are
split into train and eval by the hash rule of `moetrain.data.documents` and keep their order;
the one feature is `text`. `documents.open_source('tfds', tfds_name=NAME, data_dir=DIR)` reads
the result without TensorFlow. The build happens in a temporary folder inside DIR and moves into
DIR/NAME/1.0.0 only when complete.
"""

import argparse
import os
import pathlib
import re
import shutil
import sys
import tempfile
import types

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moetrain.data import documents  # noqa: E402
from moetrain.errors import ConfigError  # noqa: E402

VERSION = '1.0.0'
_NAME = re.compile(r'[a-z][a-z0-9]*(_[a-z0-9]+)*')


def builder_class(name: str, splits: dict):
  """A GeneratorBasedBuilder class named after ``name`` that writes ``splits`` {split: docs}."""
  import tensorflow_datasets as tfds
  from tqdm import tqdm

  def info(self):
    # disable_shuffling keeps the documents in source order: the pipeline shuffles anyway.
    return tfds.core.DatasetInfo(
        builder=self, description='Text documents written by moetrain prepare_dataset.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True)

  def split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in splits}

  def generate_examples(self, split):
    docs = splits[split]
    for index in tqdm(range(len(docs)), desc=f'{name} {split}', unit='doc'):
      yield index, {'text': docs[index]}

  def body(namespace):
    namespace.update(name=name, VERSION=tfds.core.Version(VERSION), _info=info,
                     _split_generators=split_generators, _generate_examples=generate_examples,
                     __module__='prepare_dataset')  # recorded in dataset_info.json
    # TFDS would print the scratch folder as the dataset's home; the summary line says where.
    namespace.update(_log_download_bytes=lambda self: None, _log_download_done=lambda self: None)

  title = ''.join(part.capitalize() for part in name.split('_'))
  # skip_registration: building the same name twice in one process must not clash.
  return types.new_class(title, (tfds.core.GeneratorBasedBuilder,),
                         {'skip_registration': True}, body)


def check_name(name: str, data_dir: pathlib.Path) -> None:
  """Raises ConfigError unless ``name`` is a new, unregistered TFDS name in ``data_dir``."""
  if not _NAME.fullmatch(name):
    raise ConfigError(f'--name {name!r} must be snake_case (a-z, 0-9, single underscores)')
  if (data_dir / name / VERSION).exists():
    raise ConfigError(f'{data_dir / name / VERSION} already exists; delete it or choose '
                      'another --name or --data_dir')
  import tensorflow_datasets as tfds
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  # tfds.builder would pick the registered class, not the files written here.
  raise ConfigError(f'--name {name!r} is a dataset TFDS already defines; choose another name')


def build(name: str, data_dir: pathlib.Path, splits: dict) -> pathlib.Path:
  """Writes ``splits`` as TFDS dataset ``name`` into ``data_dir``; returns its version folder."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # our tqdm bars count documents instead
  data_dir.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(dir=data_dir, prefix=f'.{name}-incomplete-'))
  try:
    builder = builder_class(name, splits)(data_dir=str(scratch), file_format='array_record')
    builder.download_and_prepare(download_dir=str(scratch / 'downloads'))
    target = data_dir / name / VERSION
    target.parent.mkdir(exist_ok=True)
    if target.exists():
      raise ConfigError(f'{target} appeared while building; left it as it is')
    os.rename(scratch / name / VERSION, target)  # atomic: readers never see a partial version
    return target
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--name', required=True, help='TFDS dataset name (snake_case)')
  parser.add_argument('--data_dir', required=True, type=pathlib.Path, help='TFDS data_dir')
  kinds = parser.add_mutually_exclusive_group(required=True)
  for kind in ('text', 'jsonl', 'parquet'):
    kinds.add_argument(f'--{kind}', metavar='FILES', help=f'{kind} files, comma-separated')
  parser.add_argument('--text_field', default='text', help='jsonl field / parquet column')
  parser.add_argument('--eval_per_mille', type=int, default=50, help='share of eval, in 1/1000')
  parser.add_argument('--on_bad_record', default='error', choices=documents.ON_BAD_RECORD,
                      help='malformed jsonl lines: stop, or skip and count them')
  return parser.parse_args(argv)


def prepare(args) -> str:
  """Validates the inputs, builds the dataset and returns a one-line summary."""
  kind = next(k for k in ('text', 'jsonl', 'parquet') if getattr(args, k) is not None)
  check_name(args.name, args.data_dir)
  # Opening both splits reads and checks every input before anything is written.
  options = dict(text_field=args.text_field, on_bad_record=args.on_bad_record,
                 eval_per_mille=args.eval_per_mille)
  splits = {split: documents.open_source(kind, getattr(args, kind), split=split, **options)
            for split in documents.FILE_SPLITS}
  target = build(args.name, args.data_dir, splits)
  skipped = sum(getattr(docs, 'skipped', 0) for docs in splits.values())
  return (f'wrote {target}: {len(splits["train"]):,} train and {len(splits["eval"]):,} eval '
          f'documents' + (f' ({skipped:,} malformed lines skipped)' if skipped else ''))


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    print(prepare(args))
  except ConfigError as error:
    print(f'prepare_dataset: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
