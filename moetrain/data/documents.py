"""Text documents from files or TFDS datasets, as grain random-access sources of ``str``.

Kinds: ``text`` (each file is a document), ``jsonl`` (each line's ``text_field``), ``parquet``
(the ``text_field`` column) and ``tfds`` (an array_record TFDS dataset, read without TensorFlow).
File sources split their records into "train" and "eval" by a hash of where a record lives (the
file name relative to its pattern, plus the line or row), so the split is disjoint and the same on
every machine. TFDS and pyarrow are imported only by the sources that need them.
"""

import array
import functools
import hashlib
import itertools
import json
import math
import operator
import pathlib
import sys

import grain
import numpy as np

from moetrain import paths
from moetrain.data import file_paths, sources
from moetrain.errors import ConfigError

KINDS = ('text', 'jsonl', 'parquet', 'tfds')
FILE_SPLITS = ('train', 'eval')
ON_BAD_RECORD = ('error', 'skip')
_ROW_GROUP_CACHE = 8  # decoded parquet row groups kept per process


def _name_is_eval(name: str, per_mille: int) -> bool:
  # The rule of sources._is_eval, so stdlib and text sources split files alike.
  return int(hashlib.sha1(name.encode('utf-8')).hexdigest()[:8], 16) % 1000 < per_mille


def _eval_mask(name: str, positions: np.ndarray, per_mille: int) -> np.ndarray:
  # splitmix64 of (line or row number + a seed from the file name): a vectorised keyed hash,
  # so the split of a parquet file with millions of rows is known without reading any row.
  seed = np.uint64(int(hashlib.sha1(name.encode('utf-8')).hexdigest()[:16], 16))
  z = np.asarray(positions, dtype=np.uint64) + seed + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return z % np.uint64(1000) < per_mille


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class _Documents:
  """A grain RandomAccessDataSource of ``str``; subclasses implement ``_read``."""

  def __init__(self, label: str, split: str, count: int):
    if count == 0:
      raise ConfigError(f'{label}: split {split!r} has no documents')
    self.label, self.split, self._count = label, split, count

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index) -> str:
    if not 0 <= operator.index(index) < self._count:
      raise IndexError(f'document {index} of {self._count}')
    return self._read(operator.index(index))

  def __repr__(self) -> str:  # grain's checkpoints identify a source by its repr
    return f'{type(self).__name__}({self.label!r}, split={self.split!r}, count={self._count})'


class TextSource(_Documents):
  """Each file is one document, decoded like ``sources.read_text``."""

  def __init__(self, paths, label: str, split: str):
    self._paths = [str(p) for p in paths]
    super().__init__(label, split, len(self._paths))

  def _read(self, index: int) -> str:
    return sources.read_text(self._paths[index])


def _jsonl_problem(raw: bytes, field: str) -> tuple[str, bool]:
  """(what is wrong with one jsonl line, '' if nothing; whether another text field fixes it)."""
  try:  # without its line ending, so that an error at the end names a column of this line
    record = json.loads(raw.decode('utf-8', errors='replace').rstrip('\r\n'))
  except json.JSONDecodeError as error:
    return f'not JSON ({error.msg}: column {error.colno})', False
  if not isinstance(record, dict):
    return f'not a JSON object (a {type(record).__name__})', False
  if field not in record:
    keys = ', '.join(map(repr, itertools.islice(record, 10))) + (', …' * (len(record) > 10))
    return f'no field {field!r} (keys: {keys or "none"})', True
  if not isinstance(record[field], str):
    return f'field {field!r} is {type(record[field]).__name__}, not a string', True
  return '', False


def _scan_jsonl(path: pathlib.Path, field: str, strict: bool, settings: str):
  """Line numbers and byte offsets of the good lines, and (line, problem) of the bad ones."""
  numbers, offsets, bad = array.array('q'), array.array('q'), []
  offset = 0
  with paths.resolve(path).open('rb') as f:
    for number, raw in enumerate(f, start=1):
      if raw.strip():
        problem, field_fixes = _jsonl_problem(raw, field)
        if problem and strict:
          other_field = (f'{settings}text_field to the key that holds the text, or '
                         if field_fixes else '')
          raise ConfigError(f'jsonl {path}:{number}: {problem}; set {other_field}'
                            f'{settings}on_bad_record=skip to skip such lines')
        if problem:
          bad.append((number, problem))
        else:
          numbers.append(number)
          offsets.append(offset)
      offset += len(raw)
  return np.array(numbers, dtype=np.int64), np.array(offsets, dtype=np.int64), bad


class JsonlSource(_Documents):
  """Non-blank lines' ``text_field``, read on demand from byte offsets found by one scan.

  A malformed line in any split raises ConfigError naming ``file:line``; with ``skip`` it is
  dropped instead, and ``skipped``/``first_bad`` report this split's malformed lines.
  """

  def __init__(self, files, label, split, text_field, per_mille, on_bad_record,
               settings='data.'):
    self._paths, self._field = [str(p) for _, p in files], text_field
    self.skipped, self.first_bad = 0, ''
    file_ids, offsets = [], []
    for file_id, (name, path) in enumerate(files):
      numbers, starts, bad = _scan_jsonl(path, text_field, on_bad_record == 'error', settings)
      keep = _eval_mask(name, numbers, per_mille) == (split == 'eval')
      offsets.append(starts[keep])
      file_ids.append(np.full(int(keep.sum()), file_id, dtype=np.int32))
      mine = _eval_mask(name, np.array([n for n, _ in bad]), per_mille) == (split == 'eval')
      bad = [item for item, keep_it in zip(bad, mine) if keep_it]
      self.skipped += len(bad)
      self.first_bad = self.first_bad or (f'{path}:{bad[0][0]}: {bad[0][1]}' if bad else '')
    self._offsets, self._file_ids = np.concatenate(offsets), np.concatenate(file_ids)
    super().__init__(label, split, len(self._offsets))

  def _read(self, index: int) -> str:
    with paths.resolve(self._paths[self._file_ids[index]]).open('rb') as f:
      f.seek(int(self._offsets[index]))
      raw = f.readline()
    return json.loads(raw.decode('utf-8', errors='replace'))[self._field]


def _parquet_rows(path: pathlib.Path, field: str, settings: str) -> list[int]:
  """Row counts of the row groups of ``path``, after checking it has a text column ``field``."""
  import pyarrow as pa
  try:
    file = _parquet_file(path)
  except (pa.ArrowException, OSError) as error:
    raise ConfigError(f'parquet {path}: {_first_line(error)}') from None
  schema = file.schema_arrow
  if field not in schema.names:
    raise ConfigError(f'parquet {path}: no column {field!r} (columns: {", ".join(schema.names)});'
                      f' set {settings}text_field to the one that holds the text')
  kind = schema.field(field).type
  if kind not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
    raise ConfigError(f'parquet {path}: column {field!r} is {kind}, not a string; set '
                      f'{settings}text_field to a text column')
  return [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]


# A cache outside the sources keeps them picklable for grain's worker processes.
@functools.lru_cache(maxsize=_ROW_GROUP_CACHE)
def _row_group(path: str, group: int, field: str):
  return _parquet_file(path).read_row_group(group, columns=[field]).column(0).combine_chunks()


def _parquet_file(path):
  """A pyarrow ParquetFile of a local path or a URL (read through epath)."""
  import pyarrow.parquet as pq
  return pq.ParquetFile(paths.resolve(path).open('rb') if paths.is_remote(path) else path)


class ParquetSource(_Documents):
  """The ``text_field`` column of parquet files; construction reads only their footers.

  Reads decode a whole row group per cache miss: for shuffled training at scale, prefer a TFDS
  array_record copy (tools/prepare_dataset.py).
  """

  def __init__(self, files, label, split, text_field, per_mille, settings='data.'):
    self._paths, self._field = [str(p) for _, p in files], text_field
    self._groups, sizes, rows, total = [], [], [], 0
    for file_id, (name, path) in enumerate(files):
      file_sizes = _parquet_rows(path, text_field, settings)
      self._groups += [(file_id, group) for group in range(len(file_sizes))]
      sizes += file_sizes
      keep = _eval_mask(name, np.arange(sum(file_sizes)), per_mille) == (split == 'eval')
      rows.append(np.flatnonzero(keep) + total)
      total += sum(file_sizes)
    # Global first row of every row group, to find a row's group by bisection.
    self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64)
    self._rows = np.concatenate(rows)
    super().__init__(label, split, len(self._rows))

  def _read(self, index: int) -> str:
    row = int(self._rows[index])
    group = int(np.searchsorted(self._starts, row, side='right')) - 1
    file_id, in_file = self._groups[group]
    column = _row_group(self._paths[file_id], in_file, self._field)
    value = column[row - int(self._starts[group])].as_py()
    if isinstance(value, bytes):
      return value.decode('utf-8', errors='replace')
    return value or ''  # a null text is an empty document


def _open_tfds(name: str, split: str, data_dir: str, field: str, settings: str):
  import tensorflow_datasets as tfds
  where = f'data_dir {data_dir!r}' if data_dir else 'the default TFDS data_dir'
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f'tfds dataset {name!r} not found in {where}') from None
  except Exception as error:  # TFDS messages run to pages; the first line says what is wrong
    raise ConfigError(f'tfds dataset {name!r}: {_first_line(error)}') from None
  # A registered but unprepared dataset would otherwise start a download.
  if not builder.is_prepared():
    raise ConfigError(f'tfds dataset {name!r} is not prepared in {where}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(f'tfds dataset {name!r} in {where} is stored as '
                      f'{builder.info.file_format.value}; random access needs array_record')
  features = builder.info.features
  if field not in features:
    raise ConfigError(f'tfds dataset {name!r} has no feature {field!r} '
                      f'(features: {", ".join(features.keys())}); set {settings}text_field to '
                      'the one that holds the text')
  if features[field].np_dtype != np.dtype(object) or features[field].shape != ():
    raise ConfigError(f'tfds dataset {name!r}: feature {field!r} is not a text scalar; set '
                      f'{settings}text_field to a text feature')
  try:
    return builder.as_data_source(split=split)
  except Exception as error:
    raise ConfigError(f'tfds dataset {name!r} split {split!r}: {_first_line(error)}') from None


class TfdsSource(_Documents):
  """The text feature ``text_field`` of a prepared array_record TFDS split (no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str, text_field: str,
               settings: str = 'data.'):
    self._source = _open_tfds(name, split, data_dir, text_field, settings)
    self._field = text_field
    super().__init__(f'tfds {name!r}', split, len(self._source))

  def _read(self, index: int) -> str:
    return self._source[index][self._field].decode('utf-8', errors='replace')


def open_source(kind: str, path: str = '', *, text_field: str = 'text', data_dir: str = '',
                tfds_name: str = '', split: str = 'train', on_bad_record: str = 'error',
                eval_per_mille: int = 50, settings: str = 'data.') -> _Documents:
  """A grain RandomAccessDataSource of the ``split`` documents of one source (see module doc).

  Errors name what fixes them as ``settings`` + ``text_field`` or ``on_bad_record``: the config
  fields by default; a tool whose flags these are passes ``'--'``.
  """
  if kind not in KINDS:
    raise ConfigError(f'unknown document source {kind!r}; expected one of {", ".join(KINDS)}')
  if on_bad_record not in ON_BAD_RECORD:
    raise ConfigError(f'on_bad_record={on_bad_record!r} must be error or skip')
  if kind == 'tfds':
    if not tfds_name:
      raise ConfigError('tfds source: no dataset name (tfds_name) given')
    return TfdsSource(tfds_name, split, data_dir, text_field, settings)
  if split not in FILE_SPLITS:
    raise ConfigError(f'{kind} source {path!r}: split {split!r} must be train or eval')
  if not 0 <= eval_per_mille <= 1000:
    raise ConfigError(f'eval_per_mille={eval_per_mille} must be between 0 and 1000')
  files, label = file_paths.expand_files(path, kind), f'{kind} {path!r}'
  if kind == 'text':
    chosen = [p for name, p in files if _name_is_eval(name, eval_per_mille) == (split == 'eval')]
    return TextSource(chosen, label, split)
  if kind == 'jsonl':
    return JsonlSource(files, label, split, text_field, eval_per_mille, on_bad_record, settings)
  return ParquetSource(files, label, split, text_field, eval_per_mille, settings)


def mixture(parts, weights=None) -> grain.MapDataset:
  """A MapDataset interleaving ``parts`` (sources or MapDatasets) in proportion to ``weights``.

  Deterministic (grain's ``MapDataset.mix``). One pass holds every document of every part at
  least once: parts short for their weight repeat (upsampling), so shuffling and repeating the
  result never leaves the tail of a large part unread.
  """
  parts = list(parts)
  weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
  if not parts or len(weights) != len(parts):
    raise ConfigError(f'mixture: {len(weights)} weights for {len(parts)} sources')
  if not all(math.isfinite(w) and w > 0 for w in weights):
    raise ConfigError(f'mixture: weights must be positive, got {weights}')
  datasets = [p if isinstance(p, grain.MapDataset) else grain.MapDataset.source(p) for p in parts]
  if len(datasets) == 1:
    return datasets[0]
  # grain turns weights into integers, the smallest 100; doing it first keeps this exact.
  shares = [round(100 * w / min(weights)) for w in weights]
  total = sum(shares)
  # grain's interleaving can be one document short of a part's exact share: hence the + 1.
  length = max(-(-(len(d) + 1) * total // s) for d, s in zip(datasets, shares))
  repeated = [d.repeat(length * s // (total * len(d)) + 1) for d, s in zip(datasets, shares)]
  return grain.MapDataset.mix(repeated, shares)[:length]


def _parse_weights(text: str) -> list[float] | None:
  try:
    weights = [float(w) for w in text.split(',')] if text.strip() else None
  except ValueError:
    weights = [math.nan]
  if weights is not None and not all(math.isfinite(w) and w > 0 for w in weights):
    raise ConfigError(f'data.weights={text!r} must be comma-separated positive numbers')
  return weights


def documents_from_config(data, split: str) -> grain.MapDataset:
  """The ``split`` ("train" or "eval") documents of a ``config.data`` section as a MapDataset:
  the embedded corpus's files, or those of the document sources below.

  Several TFDS names, or file entries with ``data.weights`` set, give one source each, mixed
  by weight (equal when empty); file entries without weights form one source.
  """
  if split not in FILE_SPLITS:
    raise ValueError(f'unknown split {split!r}, expected one of {FILE_SPLITS}')
  if data.source == 'stdlib':
    return grain.MapDataset.source(TextSource(sources.stdlib_files(split), 'stdlib', split))
  field = 'split' if split == 'train' else 'eval_split'
  name, kind = data[field], data.source
  if kind not in KINDS:
    raise ConfigError(f'data.source={kind!r} has no document source; '
                      f'expected one of {", ".join(KINDS)}')
  if kind != 'tfds' and name not in FILE_SPLITS:
    raise ConfigError(f'data.{field}={name!r} must be train or eval for data.source={kind}')
  listed = 'tfds_name' if kind == 'tfds' else 'path'
  entries, weights = file_paths.entries(data[listed]), _parse_weights(data.weights)
  if not entries:
    raise ConfigError(f'data.{listed} is empty with data.source={kind}')
  if weights is not None and len(weights) != len(entries):
    raise ConfigError(f'data.weights has {len(weights)} values for {len(entries)} entries '
                      f'of data.{listed}')
  if kind != 'tfds' and weights is None:
    entries = [data.path]
  options = dict(text_field=data.text_field, data_dir=data.data_dir, split=name,
                 on_bad_record=data.on_bad_record)
  parts = [open_source(kind, tfds_name=e, **options) if kind == 'tfds'
           else open_source(kind, e, **options) for e in entries]
  skipped = sum(getattr(part, 'skipped', 0) for part in parts)
  if skipped:
    first = next(part.first_bad for part in parts if getattr(part, 'skipped', 0))
    print(f'moetrain: data.on_bad_record=skip: skipped {skipped} malformed records of the '
          f'{split} split (the first: {first})', file=sys.stderr)
  if len(parts) == 1:
    return grain.MapDataset.source(parts[0])
  return mixture(parts, weights)
