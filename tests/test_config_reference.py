"""docs/config.md is generated from the schema and kept current."""

import importlib.util
import pathlib

import pytest

from moetrain import config as config_lib
from moetrain import config_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
  spec = importlib.util.spec_from_file_location('config_reference',
                                                ROOT / 'tools' / 'config_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _leaves(node, prefix=''):
  for key, value in node.items():
    dotted = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{dotted}.')
    else:
      yield dotted, key, value


def test_docs_config_md_is_current():
  tool = _tool()
  assert (ROOT / 'docs' / 'config.md').read_text() == tool.generate(), (
      'docs/config.md is stale: run python tools/config_reference.py')
  assert tool.main(['--check']) == 0


def test_every_field_appears_with_its_default():
  text = (ROOT / 'docs' / 'config.md').read_text()
  sections = {}
  current = None
  for line in text.splitlines():
    if line.startswith('## '):
      current = sections.setdefault(line[3:], [])
    elif line.startswith('| `') and current is not None:
      current.append(line)
  for dotted, key, value in _leaves(config_lib.default_config()):
    section = dotted.rpartition('.')[0]
    assert section in sections, f'no section {section} for {dotted}'
    rows = [row for row in sections[section] if row.startswith(f'| `{key}` |')]
    assert len(rows) == 1, f'{dotted}: expected one row, got {rows}'
    assert f'| `{value!r}` |' in rows[0], f'{dotted}: default {value!r} missing: {rows[0]}'
    for allowed in config_checks.ENUMS.get(dotted, ()):
      assert f'`{allowed}`' in rows[0], f'{dotted}: allowed value {allowed} missing'


def test_continuation_comments_are_included():
  text = (ROOT / 'docs' / 'config.md').read_text()
  assert 'full (OLMoE: over the whole projection)' in text  # model.qk_norm, second line
  assert 'or priority (lowest top router probability first)' in text  # moe.drop_policy


def test_field_without_comment_fails_loudly():
  tool = _tool()
  source = tool.CONFIG_PY.read_text()
  line = next(l for l in source.splitlines() if l.strip().startswith('t.seed = 0'))
  stripped = source.replace(line, line.partition('#')[0].rstrip())
  with pytest.raises(tool.MissingComment, match='train.seed'):
    tool.render(config_lib.default_config(), stripped, config_checks.ENUMS)


def test_check_reports_a_stale_file(tmp_path, monkeypatch, capsys):
  tool = _tool()
  stale = tmp_path / 'config.md'
  stale.write_text('# old\n')
  monkeypatch.setattr(tool, 'OUTPUT', stale)
  assert tool.main(['--check']) == 1
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and 'stale' in out[0]
