"""tools/exchange_compare.py end to end: its dry run builds, compiles and runs every variant at
tiny size on 8 CPU devices, and skips, with the reason, those this build cannot run."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from moetrain.models import two_level
from moetrain.parallel.mesh import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ['flat', 'chunked', 'two-level', 'fp8', 'combined', 'combined, block']


def test_dry_run_times_or_skips_every_variant(tmp_path):
  out = tmp_path / 'compare.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'tools' / 'exchange_compare.py'), '--dry-run', '--chunks', '2',
       '--json', str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
      # A check of the script, not a measurement: os.environ brings the tests' quick compiles.
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr
  rows = json.loads(out.read_text())
  assert [row['variant'] for row in rows] == VARIANTS
  assert 'on 8 × cpu' in result.stdout
  for row in rows:
    line = next(line for line in result.stdout.splitlines() if line.startswith(row['variant']))
    if row['skipped']:
      assert row['variant'] not in ('flat', 'chunked')  # the chunks are in every build
      assert 'layer_s' not in row and f'skipped: {row["skipped"]}' in line
    else:
      # Chunks of the whole block are timed as a step only: the layer alone has no attention.
      assert row.get('layer_s', 1) > 0 and row['step_s'] > 0 and row['compile_s'] > 0
      assert ('layer_s' in row) == (row['exchange_overlap'] == 'experts')
      assert row['tokens_per_s'] == 2 * 8 * 32 / row['step_s']  # 2 sequences per device
  by_name = {row['variant']: row for row in rows}
  assert by_name['chunked']['exchange_chunks'] == 2 and by_name['flat']['exchange_chunks'] == 1
  fields = ('exchange_chunks', 'exchange_nodes', 'exchange_dtype')
  assert [by_name['combined'][field] for field in fields] == [2, 2, 'float8_e4m3fn']


def test_bad_input_is_one_line_and_exit_status_2():
  result = subprocess.run(
      [sys.executable, str(ROOT / 'tools' / 'exchange_compare.py'), '--dry-run',
       '--config.model.moe.top_k=0'], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1 and 'model.moe.top_k' in result.stderr, result.stderr


def test_a_feature_the_layer_ignores_is_not_available(monkeypatch):
  """How the dry run would skip two-level in a build without it."""
  monkeypatch.syspath_prepend(str(ROOT / 'tools'))  # its own imports, as when run as a script
  spec = importlib.util.spec_from_file_location('exchange_compare',
                                                ROOT / 'tools' / 'exchange_compare.py')
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  args = argparse.Namespace(config='configs/bench_e8k2.py', chunks=2, dry_run=True, overrides=[])
  config = tool.load(args, tool.variants(chunks=2, nodes=2)['combined'])
  mesh = make_mesh(config)
  assert tool.unavailable(config, mesh) is None
  monkeypatch.setattr(two_level, 'node_aware', lambda flat, moe_config=None: flat)
  assert tool.unavailable(config, mesh) == (
      'model.moe.exchange_nodes=2: not available in this build')
