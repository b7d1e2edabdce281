"""The files a data path names: comma-separated files, directories or glob patterns, local or
in an object store (gs://…)."""

import glob
import itertools
import pathlib

from etils import epath

from moetrain import paths
from moetrain.errors import ConfigError

_GLOB_CHARS = frozenset('*?[')


def entries(spec: str) -> list[str]:
  """The comma-separated entries of a data path, stripped, empty ones dropped."""
  return [entry.strip() for entry in spec.split(',') if entry.strip()]


def _match_remote(entry: str) -> list[tuple[str, epath.Path]]:
  """`_match` for a URL (gs://…): object stores list one level per call, so a pattern may
  not hold `**`; a directory is walked."""
  if '**' in entry:
    raise ConfigError(f'{entry}: ** is not supported in object-store paths; use * per level')
  parts = entry.split('/')
  if _GLOB_CHARS & set(entry):
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    root = paths.resolve('/'.join(parts[:first]))
    matches = root.glob('/'.join(parts[first:]))
    return [(p.relative_to(root).as_posix(), p) for p in matches if p.is_file()]
  path = paths.resolve(entry)
  if path.is_dir():
    return [(p.relative_to(path).as_posix(), p)
            for directory, _, names in path.walk() for p in (directory / n for n in names)
            if not any(part.startswith('.') for part in p.relative_to(path).parts)]
  return [(path.name, path)] if path.is_file() else []


def _match(entry: str) -> list[tuple[str, pathlib.Path]]:
  if paths.is_remote(entry):
    return _match_remote(entry)
  path = pathlib.Path(entry)
  if _GLOB_CHARS & set(entry):
    root = pathlib.Path(*itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), path.parts))
    matches = [pathlib.Path(p) for p in glob.glob(entry, recursive=True)]
    return [(p.relative_to(root).as_posix(), p) for p in matches if p.is_file()]
  if path.is_dir():
    files = [p for p in path.rglob('*') if p.is_file()
             and not any(part.startswith('.') for part in p.relative_to(path).parts)]
    return [(p.relative_to(path).as_posix(), p) for p in files]
  return [(path.name, path)] if path.is_file() else []


def expand_files(spec: str, kind: str) -> list[tuple[str, pathlib.Path]]:
  """Sorted, distinct ``(name, path)`` of the files that comma-separated paths or globs match.

  ``name`` (the key of the split) is relative to a directory entry or to a pattern's part
  before its first wildcard, so it does not depend on where the data is mounted.
  """
  found = {}
  for entry in entries(spec):
    matched = _match(entry)
    if not matched:
      raise ConfigError(f'{kind} source: no files match {entry!r}')
    for name, path in matched:
      found.setdefault(path if paths.is_remote(path) else path.resolve(), (name, path))
  if not found:
    raise ConfigError(f'{kind} source: no path given')
  return sorted(found.values(), key=lambda item: str(item[1]))
