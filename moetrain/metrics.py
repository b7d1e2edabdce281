"""Training metrics: one JSON object per record in `metrics.jsonl`, and TensorBoard scalars."""

import json
import pathlib

import numpy as np
import tensorboardX


def to_python(value):
  """Device scalars and arrays → floats and (nested) lists of floats, for JSON."""
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


def scalars(record: dict, prefix: str = ''):
  """Flattens a record into (tag, float) pairs: lists become `tag/i/j` scalars."""
  for key, value in record.items():
    if key in ('step', 'split'):
      continue
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
      yield f'{prefix}{key}', float(array)
    else:
      for index in np.ndindex(array.shape):
        yield f'{prefix}{key}/' + '/'.join(map(str, index)), float(array[index])


class MetricsWriter:
  """Appends records to `workdir/metrics.jsonl` and to TensorBoard event files.

  Only one process of a multi-host run should write (`enabled=False` elsewhere).
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True, resumed_at: int | None = None):
    """`resumed_at`: the step a run (re)starts from; records after it are dropped, as the run
    writes them again."""
    self.enabled = enabled
    if enabled:
      path = pathlib.Path(workdir) / 'metrics.jsonl'
      if resumed_at is not None and path.exists():
        kept = [line for line in path.read_text(encoding='utf-8').splitlines(keepends=True)
                if line.strip() and json.loads(line)['step'] <= resumed_at]
        path.write_text(''.join(kept), encoding='utf-8')
      self.jsonl = open(path, 'a', encoding='utf-8')
      self.tensorboard = tensorboardX.SummaryWriter(str(workdir))

  def write(self, step: int, record: dict, split: str = 'train') -> dict:
    """Writes `record` (device values allowed) for `step`; returns it as plain Python."""
    plain = {'step': int(step), **{k: to_python(v) for k, v in record.items()}}
    if split != 'train':
      plain['split'] = split
    if self.enabled:
      self.jsonl.write(json.dumps(plain) + '\n')
      self.jsonl.flush()
      for tag, value in scalars(plain, prefix=f'{split}/'):
        self.tensorboard.add_scalar(tag, value, int(step))
      self.tensorboard.flush()
    return plain

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
