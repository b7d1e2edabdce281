"""The embedded corpus: the Python standard library's own ``.py`` files.

Every machine that runs moetrain has this corpus, so the default config can
train without downloading anything. The exact file set depends on the Python
version, which is why caches derived from it are keyed by the file list.
"""

import hashlib
import io
import os
import pathlib
import sysconfig

from moetrain import paths

SPLITS = ('train', 'eval')

# Third-party packages are not the standard library; __pycache__ holds bytecode.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})

# Share of files (in thousandths) whose path hash sends them to "eval".
_EVAL_PER_MILLE = 50


def stdlib_root() -> pathlib.Path:
  """The directory of the running interpreter's standard library."""
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def _is_excluded_dir(name: str) -> bool:
  # Test suites (test, tests, test_*, idle_test, ...) are large, repetitive
  # and full of deliberately odd code, so they are left out. Prefix/suffix
  # matching on folder names is the whole rule: files named test_*.py that sit
  # outside such folders are kept.
  return name in _EXCLUDED_DIRS or name.startswith('test') or name.endswith('_test')


def _is_eval(relative: str) -> bool:
  # A hash of the path (not of the content, not a random draw) keeps a file
  # in the same split on every machine and across edits to the file.
  digest = hashlib.sha1(relative.encode('utf-8')).hexdigest()
  return int(digest[:8], 16) % 1000 < _EVAL_PER_MILLE


def stdlib_files(split: str) -> list[pathlib.Path]:
  """Sorted ``.py`` files of the standard library in ``split`` ("train" or "eval").

  Files are split whole (~5% to eval), by a hash of their path relative to the
  stdlib root, so the split is deterministic and disjoint.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}, expected one of {SPLITS}')
  root = stdlib_root()
  want_eval = split == 'eval'
  found: list[tuple[str, pathlib.Path]] = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place stops os.walk from descending into site-packages,
    # which can be far larger than the stdlib itself.
    dirnames[:] = [d for d in dirnames if not _is_excluded_dir(d)]
    for name in filenames:
      if not name.endswith('.py'):
        continue
      path = pathlib.Path(dirpath, name)
      relative = path.relative_to(root).as_posix()
      if _is_eval(relative) == want_eval:
        found.append((relative, path))
  return [path for _, path in sorted(found)]


def relative_name(path: pathlib.Path) -> str:
  """``path`` relative to the stdlib root, in POSIX form (stable cache keys)."""
  return pathlib.Path(path).relative_to(stdlib_root()).as_posix()


def read_text(path: pathlib.Path) -> str:
  """The text of ``path``, decoded as UTF-8.

  Line endings are normalised to "\\n" (Python's universal newlines), and bytes
  that are not valid UTF-8 become U+FFFD instead of raising, so one odd file
  never stops a run; stdlib sources are UTF-8, so neither changes them in
  practice.
  """
  with paths.resolve(path).open('rb') as f:  # local, or a URL such as gs://bucket/doc.txt
    return io.TextIOWrapper(f, encoding='utf-8', errors='replace').read()
