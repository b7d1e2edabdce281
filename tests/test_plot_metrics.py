"""tools/plot_metrics.py on a synthetic metrics.jsonl, and the writer's expert-load images."""

import importlib.util
import json
import pathlib
import struct

import numpy as np
import pytest

from moetrain import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS, EXPERTS = 2, 4


def load_tool():
  """The tool as a module; tools/ is not a package."""
  spec = importlib.util.spec_from_file_location('plot_metrics', ROOT / 'tools/plot_metrics.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_record(step: int, rng) -> dict:
  fractions = rng.dirichlet(np.ones(EXPERTS), size=LAYERS)
  return {'step': step, 'loss': 9.0 - 0.1 * step, 'aux_loss': 2.0 + rng.random(),
          'z_loss': 5.0 - 0.1 * step, 'learning_rate': 3e-4, 'tokens_per_sec': 1000.0,
          'expert_fraction': fractions.tolist(),
          'dropped_fraction': rng.random(LAYERS).tolist(),
          'max_load': (fractions.max(axis=1) * EXPERTS).tolist(),
          'experts_per_token': [2.0] * LAYERS, 'router_entropy': [1.3] * LAYERS,
          'router_bias': np.zeros((LAYERS, EXPERTS)).tolist()}


def write_run(workdir: pathlib.Path) -> pathlib.Path:
  """10 train records every 5 steps (the last uneven, as at a run's end) and 2 eval records."""
  rng = np.random.default_rng(0)
  steps = [5 * i for i in range(1, 10)] + [47]
  records = [train_record(step, rng) for step in steps]
  records.insert(2, {'step': 10, 'loss': 8.1, 'split': 'eval'})
  records.append({'step': 47, 'loss': 4.5, 'split': 'eval'})
  workdir.mkdir(exist_ok=True)
  path = workdir / 'metrics.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


def test_plots_written(tmp_path, capsys):
  from matplotlib import image
  write_run(tmp_path / 'run')
  out = tmp_path / 'plots'
  assert load_tool().main([str(tmp_path / 'run'), '--out', str(out)]) == 0
  names = ['loss.png', 'expert_load_layer0.png', 'expert_load_layer1.png',
           'dropped_fraction.png']
  printed = capsys.readouterr().out.splitlines()
  assert [line.strip() for line in printed[1:-1]] == [str(out / name) for name in names]
  assert printed[-1] == ("TensorBoard (scalars, expert-load images, profiles; pip install -e "
                         f"'.[tensorboard]'): tensorboard --logdir {tmp_path / 'run'}")
  for name in names:
    with open(out / name, 'rb') as file:
      assert file.read(8) == b'\x89PNG\r\n\x1a\n'
    pixels = image.imread(out / name)
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 400
    assert pixels.std() > 0.05  # something was drawn, not a blank canvas


def test_default_out_dir(tmp_path):
  write_run(tmp_path)
  assert load_tool().main([str(tmp_path)]) == 0
  assert (tmp_path / 'plots' / 'expert_load_layer1.png').is_file()


def test_dense_run(tmp_path, capsys):
  """A model without MoE layers logs empty per-layer lists: only the loss plot is made."""
  records = [{'step': s, 'loss': 5.0, 'aux_loss': 0.0, 'z_loss': 0.0, 'expert_fraction': [],
              'dropped_fraction': []} for s in (1, 2)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert load_tool().main([str(tmp_path)]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert [line.strip() for line in printed[1:-1]] == [str(tmp_path / 'plots' / 'loss.png')]


def test_a_single_record_is_drawn(tmp_path, monkeypatch):
  """A line needs two points: one logged record must still show, as markers."""
  rng = np.random.default_rng(0)
  (tmp_path / 'metrics.jsonl').write_text(json.dumps(train_record(5, rng)) + '\n')
  tool = load_tool()
  figures, save = {}, tool._save
  monkeypatch.setattr(tool, '_save',
                      lambda fig, path: (figures.setdefault(path.name, fig), save(fig, path))[1])
  assert tool.main([str(tmp_path)]) == 0
  assert (tmp_path / 'plots' / 'expert_load_layer1.png').is_file()
  lines = [(ax, line) for name in ('loss.png', 'dropped_fraction.png')
           for ax in figures[name].axes for line in ax.get_lines()]
  # train loss, aux_loss, z_loss, and dropped_fraction of each MoE layer
  assert len(lines) == 3 + LAYERS
  for ax, line in lines:
    assert len(line.get_xdata()) == 1
    assert line.get_marker() not in ('None', '', ' ', None) and line.get_markersize() > 0
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 <= line.get_xdata()[0] <= x1 and y0 <= line.get_ydata()[0] <= y1


@pytest.mark.parametrize('setup', ['missing', 'no_file', 'empty', 'garbage'])
def test_bad_input(tmp_path, capsys, setup):
  workdir = tmp_path / 'run'
  if setup != 'missing':
    workdir.mkdir()
  if setup == 'empty':
    (workdir / 'metrics.jsonl').write_text('\n', encoding='utf-8')
  if setup == 'garbage':
    (workdir / 'metrics.jsonl').write_text('{"step": 1, "loss"\n', encoding='utf-8')
  assert load_tool().main([str(workdir)]) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('plot_metrics: error: ')
  assert not (workdir / 'plots').exists()


def read_events(workdir: pathlib.Path):
  """Every Event in the workdir's event files, parsed from the TFRecord framing by hand."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      # Each record: uint64 length, uint32 length CRC, payload, uint32 payload CRC.
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def test_writer_adds_expert_load_images(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.MetricsWriter, 'IMAGE_EVERY', 3)
  rng = np.random.default_rng(0)
  writer = metrics.MetricsWriter(tmp_path)
  for step in range(1, 5):
    record = train_record(step, rng)
    del record['step']
    writer.write(step, record)
  writer.write(4, {'loss': 3.0}, split='eval')
  writer.close()
  images = [(event.step, value.tag, value.image) for event in read_events(tmp_path)
            for value in event.summary.value if value.HasField('image')]
  # Every third train record (step 3) and at close (step 4), once per MoE layer.
  assert sorted((step, tag) for step, tag, _ in images) == [
      (3, 'expert_load/layer0'), (3, 'expert_load/layer1'),
      (4, 'expert_load/layer0'), (4, 'expert_load/layer1')]
  for step, _, image in images:
    assert image.encoded_image_string.startswith(b'\x89PNG')
    assert (image.height, image.width) == (EXPERTS * 8, step * 8)
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 5


def test_load_image():
  history = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
  pixels = metrics.load_image(history, cell=2)
  assert pixels.dtype == np.uint8 and pixels.shape == (8, 4)
  assert pixels[0, 0] == 255 and pixels[-1, 0] == 0 and pixels[0, -1] == 128
