"""Plots a run's `metrics.jsonl` to PNG files.

  python tools/plot_metrics.py DIR [--out DIR/plots]

DIR is a run's workdir. Writes `loss.png` (train and eval loss; aux and z loss),
`expert_load_layer{i}.png` per MoE layer (the fraction of assignments each expert received at
each logged step) and `dropped_fraction.png` (per MoE layer), and prints the paths written.
"""

import argparse
import io
import json
import pathlib
import sys

import numpy as np

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moetrain import paths  # noqa: E402


class PlotError(Exception):
  pass


def read_records(workdir: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """(train records, eval records) from `workdir/metrics.jsonl`, each in file order."""
  if not workdir.is_dir():
    raise PlotError(f'{workdir}: no such directory')
  path = workdir / 'metrics.jsonl'
  if not path.is_file():
    raise PlotError(f'{path}: no such file')
  train, evals = [], []
  for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise PlotError(f'{path}:{number}: not JSON ({error.msg})') from None
    if not isinstance(record, dict) or 'step' not in record:
      raise PlotError(f'{path}:{number}: not a metrics record')
    (evals if record.get('split', 'train') == 'eval' else train).append(record)
  if not train and not evals:
    raise PlotError(f'{path}: no records')
  return train, evals


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that carry `key`; values keep any per-layer axes."""
  kept = [r for r in records if key in r]
  return (np.array([r['step'] for r in kept]),
          np.array([r[key] for r in kept], dtype=np.float64))


def _figure(*args, **kwargs):
  # Agg renders to files without a display, so the tool also runs on headless machines.
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt.subplots(*args, **kwargs)


def _plot(ax, steps: np.ndarray, values: np.ndarray, **kwargs) -> None:
  """`ax.plot`, with a marker on a series of one point, which a line alone would not show."""
  if len(steps) == 1 and kwargs.get('marker') is None:
    kwargs['marker'] = 'o'
  ax.plot(steps, values, **kwargs)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  import matplotlib.pyplot as plt
  png = io.BytesIO()  # through bytes, so a gs:// workdir takes the plots as well
  fig.savefig(png, format='png', dpi=100)
  path.write_bytes(png.getvalue())
  plt.close(fig)  # figures otherwise stay alive in pyplot's registry
  return path


def plot_loss(train: list[dict], evals: list[dict], out: pathlib.Path) -> pathlib.Path:
  """Train and eval cross-entropy on top; the auxiliary and z losses below."""
  fig, (top, bottom) = _figure(2, 1, figsize=(9, 7), sharex=True, layout='constrained')
  for records, label, marker in ((train, 'train', None), (evals, 'eval', 'o')):
    steps, values = series(records, 'loss')
    if len(steps):
      _plot(top, steps, values, marker=marker, label=f'{label} loss', markersize=4)
  top.set_ylabel('cross-entropy loss')
  top.set_title('Loss')
  top.legend()
  top.grid(alpha=0.3)
  for key in ('aux_loss', 'z_loss'):
    steps, values = series(train, key)
    if len(steps):
      _plot(bottom, steps, values, label=key)
  bottom.set_xlabel('step')
  bottom.set_ylabel('router loss (summed over MoE layers)')
  bottom.set_title('Auxiliary losses')
  if bottom.get_legend_handles_labels()[0]:
    bottom.legend()
  bottom.grid(alpha=0.3)
  return _save(fig, out / 'loss.png')


def _edges(steps: np.ndarray) -> np.ndarray:
  """Cell boundaries around each step, so unevenly logged steps keep their true positions."""
  if len(steps) == 1:
    return np.array([steps[0] - 0.5, steps[0] + 0.5])
  middles = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def plot_expert_load(train: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """One heatmap per MoE layer: experts × logged steps, coloured by share of assignments."""
  from matplotlib.colors import TwoSlopeNorm
  from matplotlib.ticker import MaxNLocator
  steps, fractions = series(train, 'expert_fraction')  # [steps, layers, experts]
  if not len(steps) or fractions.ndim != 3:
    return []
  num_experts = fractions.shape[2]
  uniform = 1 / num_experts
  # Centre a diverging map on the balanced share: white = balanced, red = overloaded.
  norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(fractions.max(), 2 * uniform))
  paths = []
  for layer in range(fractions.shape[1]):
    fig, ax = _figure(figsize=(9, 1.5 + 0.25 * min(num_experts, 64)), layout='constrained')
    mesh = ax.pcolormesh(_edges(steps), np.arange(num_experts + 1) - 0.5,
                         fractions[:, layer].T, cmap='RdBu_r', norm=norm)
    ax.set_xlabel('step')
    ax.set_ylabel('expert')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f'Expert load, MoE layer {layer}')
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_label(f'fraction of assignments (uniform 1/E = {uniform:.3g})')
    bar.ax.axhline(uniform, color='black', linewidth=1)
    paths.append(_save(fig, out / f'expert_load_layer{layer}.png'))
  return paths


def plot_dropped(train: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """Share of assignments dropped by expert capacity, one line per MoE layer."""
  steps, dropped = series(train, 'dropped_fraction')  # [steps, layers]
  if not len(steps) or dropped.ndim != 2 or not dropped.shape[1]:  # a dense model has no layers
    return []
  fig, ax = _figure(figsize=(9, 4.5), layout='constrained')
  for layer in range(dropped.shape[1]):
    _plot(ax, steps, dropped[:, layer], label=f'MoE layer {layer}')
  ax.set_xlabel('step')
  ax.set_ylabel('dropped fraction of assignments')
  ax.set_title('Tokens dropped by expert capacity')
  ax.set_ylim(bottom=0)
  ax.legend()
  ax.grid(alpha=0.3)
  return [_save(fig, out / 'dropped_fraction.png')]


def plot(workdir: pathlib.Path, out: pathlib.Path | None = None) -> list[pathlib.Path]:
  """Writes every plot the records allow into `out` (default `workdir/plots`); both may be
  local paths or URLs such as gs://bucket/run."""
  workdir = paths.resolve(workdir)
  train, evals = read_records(workdir)
  out = paths.resolve(out) if out is not None else workdir / 'plots'
  out.mkdir(parents=True, exist_ok=True)
  return [plot_loss(train, evals, out), *plot_expert_load(train, out),
          *plot_dropped(train, out)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('dir', help='a run workdir holding metrics.jsonl (a path or gs:// URL)')
  parser.add_argument('--out', help='output directory (default DIR/plots)')
  args = parser.parse_args(argv)
  try:
    paths = plot(args.dir, args.out)
  except PlotError as error:
    print(f'plot_metrics: error: {error}', file=sys.stderr)
    return 2
  print('plots:\n' + '\n'.join(f'  {path}' for path in paths))
  print("TensorBoard (scalars, expert-load images, profiles; pip install -e '.[tensorboard]'): "
        f'tensorboard --logdir {args.dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
