"""Training metrics: one JSON object per record in `metrics.jsonl`, and TensorBoard scalars
and expert-load heatmaps."""

import collections
import json

import numpy as np

from moetrain import paths


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


def load_image(history, cell: int = 8) -> np.ndarray:
  """[steps, E] expert fractions → uint8 heatmap with experts as rows, logged steps as columns.

  Rendered with numpy alone, so training needs no plotting library: values are scaled so the
  largest share is white, and each cell is repeated `cell` pixels wide and high to be visible.
  """
  array = np.asarray(history, dtype=np.float64).T
  peak = array.max()
  scaled = array / peak if peak > 0 else np.zeros_like(array)
  pixels = np.round(scaled * 255).astype(np.uint8)
  return np.repeat(np.repeat(pixels, cell, axis=0), cell, axis=1)


class MetricsWriter:
  """Appends records to `workdir/metrics.jsonl` and to TensorBoard event files.

  Only one process of a multi-host run should write (`enabled=False` elsewhere). Train records
  with `expert_fraction` also feed one `expert_load/layer{i}` image per MoE layer, added
  every `IMAGE_EVERY` such records and at `close()`; an image is far larger than a scalar, so
  writing one per record would swell the event file.
  """

  IMAGE_EVERY = 20
  # Logged steps kept for the heatmaps, so long runs keep a bounded image and memory.
  IMAGE_HISTORY = 256

  def __init__(self, workdir, enabled: bool = True, resumed_at: int | None = None):
    """`workdir`: a local path or URL (see moetrain.paths). `resumed_at`: the step a run
    (re)starts from; records after it are dropped, as the run writes them again."""
    self.enabled = enabled
    if enabled:
      path = paths.resolve(workdir) / 'metrics.jsonl'
      if resumed_at is not None and path.exists():
        kept = [line for line in path.read_text(encoding='utf-8').splitlines(keepends=True)
                if line.strip() and json.loads(line)['step'] <= resumed_at]
        path.write_text(''.join(kept), encoding='utf-8')
      self.jsonl = paths.appender(path)
      self.tensorboard = paths.tensorboard_writer(workdir)
    self.images = enabled
    self.load_history = collections.deque(maxlen=self.IMAGE_HISTORY)
    self.load_records, self.image_step = 0, None

  def write(self, step: int, record: dict, split: str = 'train') -> dict:
    """Writes `record` (device values allowed) for `step`; returns it as plain Python."""
    plain = {'step': int(step), **{k: to_python(v) for k, v in record.items()}}
    if split != 'train':
      plain['split'] = split
    if self.enabled:
      self.jsonl.write((json.dumps(plain) + '\n').encode('utf-8'))
      self.jsonl.flush()
      for tag, value in scalars(plain, prefix=f'{split}/'):
        self.tensorboard.add_scalar(tag, value, int(step))
      if self.images and split == 'train' and 'expert_fraction' in plain:
        self.load_history.append((plain['step'], plain['expert_fraction']))
        self.load_records += 1
        if self.load_records % self.IMAGE_EVERY == 0:
          self.write_load_images()
      self.tensorboard.flush()
    return plain

  def write_load_images(self):
    """Adds the expert-load heatmap of each MoE layer at the latest logged step."""
    step = self.load_history[-1][0] if self.load_history else None
    if step is None or step == self.image_step:
      return
    fractions = np.asarray([f for _, f in self.load_history], dtype=np.float64)  # [T, L, E]
    if fractions.ndim != 3:
      return
    for layer in range(fractions.shape[1]):
      self.tensorboard.add_image(f'expert_load/layer{layer}', load_image(fractions[:, layer]),
                                 step, dataformats='HW')
    self.image_step = step

  def close(self):
    if self.enabled:
      if self.images:
        self.write_load_images()
      self.jsonl.close()
      self.tensorboard.close()
