"""Every path a run reads or writes, local or in object storage (`gs://bucket/…`), as an
`etils.epath.Path`: the abstraction Orbax itself uses, so checkpoints, metrics, TensorBoard
events and config land in the same place whatever the workdir is.

Object stores cannot append: `appender` gives a file that rewrites the whole object at each
flush (what TensorFlow's own GCS files do), so metrics and event files grow there as they do
on disk.
"""

import os
import uuid

from etils import epath

from moetrain.errors import ConfigError


def is_remote(path) -> bool:
  """True for a URL such as `gs://bucket/run`, False for a local path."""
  return '://' in os.fspath(path)


def resolve(path) -> epath.Path:
  """`path` as an epath.Path; a local one with `~` and `$VARS` expanded."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.expandvars(os.path.expanduser(text)))


def absolute(path) -> epath.Path:
  """`resolve(path)`, made absolute when local (Orbax wants absolute directories)."""
  path = resolve(path)
  return path if is_remote(path) else path.absolute()


def check_reachable(path, flag: str) -> epath.Path:
  """`resolve(path)`; ConfigError naming `flag` when its storage cannot be used here (a
  `gs://` path without gcsfs installed)."""
  resolved = resolve(path)
  try:
    resolved.exists()
  except ImportError as error:
    raise ConfigError(f'{flag} {path}: {os.fspath(path).split("://")[0]}:// paths need an '
                      "extra package: pip install -e '.[gcs]'") from error
  return resolved


def write_text(path, text: str) -> None:
  """Writes `text` to `path` whole or not at all: a local file through a sibling renamed over
  it, an object in one upload."""
  path = resolve(path)
  if is_remote(path):
    path.write_text(text, encoding='utf-8')
    return
  partial = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.partial')
  partial.write_text(text, encoding='utf-8')
  os.replace(partial, path)


class _ObjectAppender:
  """Appends to an object by rewriting it whole at each flush; starts from what it holds.
  (No `fileno`: callers that fsync local files skip it.)"""

  def __init__(self, path: epath.Path):
    self.path = path
    self.data = bytearray(path.read_bytes() if path.exists() else b'')
    self.dirty = False
    self.closed = False

  def write(self, data: bytes) -> int:
    self.data += data
    self.dirty = True
    return len(data)

  def flush(self) -> None:
    if self.dirty:
      self.path.write_bytes(bytes(self.data))
      self.dirty = False

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


def appender(path):
  """A binary file appending to `path` (created if absent): write, flush, close."""
  path = resolve(path)
  if is_remote(path):
    return _ObjectAppender(path)
  return open(path, 'ab')


class _TensorBoardFiles:
  """tensorboardX's writer factory for remote logdirs, through `appender`."""

  def open(self, path: str):
    return appender(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def tensorboard_writer(logdir):
  """A tensorboardX SummaryWriter for `logdir`, local or remote, that does not import torch.

  tensorboardX imports torch when it is installed, only to accept torch tensors; training
  logs numpy, and importing torch costs seconds of start-up, so the import is refused here.
  """
  import sys
  torch_absent = 'torch' not in sys.modules
  if torch_absent:
    sys.modules['torch'] = None
  try:
    import tensorboardX
    from tensorboardX import record_writer
  finally:
    if torch_absent:
      del sys.modules['torch']
  logdir = resolve(logdir)
  if is_remote(logdir):
    record_writer.register_writer_factory(os.fspath(logdir).split('://')[0], _TensorBoardFiles())
  return tensorboardX.SummaryWriter(os.fspath(logdir))
