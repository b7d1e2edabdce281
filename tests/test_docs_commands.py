"""Every shell command in README.md and docs/*.md works as written, from the repository root.

Each command is run where that is cheap, and otherwise checked as far as possible without
running it: its program and files exist and its flags parse (a training command goes through
moetrain.train's own checks: command line, config file, overrides). `HOW` lists every kind of
command and, for those not run, why; a command of a new kind fails until it is added there.
"""

import argparse
import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from moetrain import config as config_lib
from moetrain import train
from moetrain.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]

# Every kind of command the docs hold: run, or why not and what is checked instead.
HOW = {
    'make train': 'installs into .venv and trains for minutes: `make -n` prints its commands, '
                  'each checked in turn',
    'make test': 'installs the test extra and runs the whole suite: `make -n` prints its '
                 'commands, each checked in turn',
    'moetrain.train': 'trains (minutes on a CPU, hours on accelerators): the command line, the '
                      'config file and its overrides pass moetrain.train\'s checks',
    'moetrain.generate': 'needs a trained checkpoint: the flags parse',
    'moetrain.evaluate': 'needs a trained checkpoint: the flags parse',
    'tools/inspect_checkpoint.py': 'needs a trained checkpoint: the flags parse',
    'tools/convert_checkpoint.py': 'needs downloaded Hugging Face checkpoints (gigabytes) or '
                                   'trained ones: the flags and any config overrides parse',
    'tools/compress_experts.py': 'needs a trained checkpoint (tests/test_compress_experts.py '
                                 'runs it on one): the flags parse',
    'tools/prepare_dataset.py': "reads the reader's own corpus and writes under $HOME: the flags "
                                'parse',
    'tools/train_tokenizer.py': "trains on the reader's own corpus: the flags, the config and "
                                'its overrides parse',
    'tools/plot_metrics.py': 'needs a run\'s metrics: the flags parse',
    'tools/golden_losses.py': 'trains two small configs (tests/test_golden.py does): the flags '
                              'parse',
    'tools/benchmark.py': 'compiles and times train steps for minutes: the flags, the config '
                          'and its overrides parse',
    'pip install': 'downloads and installs packages: the extras it names exist in setup.py',
    'tensorboard': 'a viewer, from the tensorboard extra the test install lacks: the extra '
                   'exists in setup.py',
    'launch/local_multiprocess.sh': 'trains: run with --dry-run, each printed training '
                                    'command checked',
    'launch/tpu_pod.sh': 'needs a Cloud TPU slice: run with --dry-run, the printed training '
                         'command checked',
    'launch/gpu_slurm.sh': 'needs a SLURM cluster: run with --dry-run, the printed training '
                           'command checked',
    '... -- TRAIN_ARGS': 'training arguments for a launcher: checked as a training command',
    '--config.* overrides': 'flags to add to a training command: loaded as overrides of '
                            'configs/tiny.py',
    'python -c': None,  # run, in a scratch directory holding the workdir it reads
}


@dataclasses.dataclass(frozen=True)
class Command:
  doc: str  # e.g. docs/train.md:42
  text: str  # as written, continuation lines included
  expected: str = ''  # output shown after a `$ ` command in a plain block


def _blocks(text: str):
  """(language, first line number, dedented lines) of every fenced code block."""
  for match in re.finditer(r'^( *)```(\w*)\n(.*?)^\1```', text, re.M | re.S):
    indent = len(match.group(1))
    line = text.count('\n', 0, match.start(3)) + 1
    yield match.group(2), line, [row[indent:] for row in match.group(3).splitlines()]


def _logical_lines(lines, first):
  """(line number, text) with backslash-continued lines joined, as the shell reads them."""
  joined, start = [], None
  for number, row in enumerate(lines, first):
    start = number if start is None else start
    joined.append(row)
    if not row.endswith('\\'):
      yield start, '\n'.join(joined)
      joined, start = [], None


def doc_commands() -> list[Command]:
  """Shell blocks: every command; plain blocks: `$ ` lines with the output under them."""
  found = []
  for path in DOCS:
    name = path.relative_to(ROOT).as_posix()
    for language, first, lines in _blocks(path.read_text(encoding='utf-8')):
      if language in ('sh', 'bash'):
        found += [Command(f'{name}:{number}', text) for number, text in
                  _logical_lines(lines, first) if shlex.split(text, comments=True)]
      elif not language:
        rows = list(_logical_lines(lines, first))
        for i, (number, text) in enumerate(rows):
          if text.startswith('$ '):
            output = []
            for _, after in rows[i + 1:]:
              if after.startswith('$ '):
                break
              output.append(after)
            found.append(Command(f'{name}:{number}', text[2:], '\n'.join(output)))
  return found


COMMANDS = doc_commands()


def words(text: str) -> list[str]:
  """The words a shell makes of `text` (quotes, `$HOME`, comments): bash itself splits it."""
  result = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + text], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, f'not valid shell: {text}\n{result.stderr}'
  return result.stdout.split('\0')[:-1]


def kind(argv: list[str]) -> str:
  """The `HOW` key of a command line."""
  program, first = argv[0], argv[1] if len(argv) > 1 else ''
  if program == 'make':
    return 'make ' + next((w for w in argv[1:] if '=' not in w), '')
  if program == '.venv/bin/python' and first == '-m':
    return 'pip install' if argv[2:4] == ['pip', 'install'] else argv[2]
  if program == '.venv/bin/python':
    return 'python -c' if first == '-c' else first
  if program == '.venv/bin/pip' and first == 'install':
    return 'pip install'
  if program == '.venv/bin/tensorboard':
    return 'tensorboard'
  if program.startswith('launch/'):
    return program
  if program in ('...', '…') and first == '--':
    return '... -- TRAIN_ARGS'
  if all(w.startswith('--config.') for w in argv):
    return '--config.* overrides'
  return ' '.join(argv)


# --- the checks -------------------------------------------------------------------------


def check_train(args, expected=''):
  """What moetrain.train checks before touching data or devices; with `expected`, the one-line
  error the docs show for the command."""
  def load():
    config_path, _, overrides, _ = train.parse_command_line(list(args), environ={})
    config_lib.load(config_path, overrides)
  if not expected:
    load()
    return
  with pytest.raises(ConfigError) as error:
    load()
  assert f'moetrain: error: {error.value}' == expected


class Parsed(BaseException):  # not an Exception: a tool's `except` clauses let it through
  def __init__(self, namespace, extras):
    super().__init__()
    self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def stop_after_parsing():
  """The outermost argparse call of a tool raises Parsed instead of returning, so the tool's
  command line is checked (argparse's own errors included) without running it."""
  real_known = argparse.ArgumentParser.parse_known_args
  real_args = argparse.ArgumentParser.parse_args
  depth = [0]

  def call(real, parser, args, namespace):
    depth[0] += 1
    try:
      return real(parser, args, namespace)
    finally:
      depth[0] -= 1

  def parse_known_args(parser, args=None, namespace=None):
    result = call(real_known, parser, args, namespace)
    if depth[0]:  # a subcommand's parser, or parse_args, which still checks the extras
      return result
    raise Parsed(*result)

  def parse_args(parser, args=None, namespace=None):
    result = call(real_args, parser, args, namespace)
    if depth[0]:
      return result
    raise Parsed(result, [])

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(argparse.ArgumentParser, 'parse_known_args', parse_known_args)
    patch.setattr(argparse.ArgumentParser, 'parse_args', parse_args)
    yield


_TOOLS = {}


def tool_main(name: str):
  """`main` of a moetrain module or of a tools/ script (loaded once, as the script runs)."""
  if name not in _TOOLS:
    if name.startswith('moetrain.'):
      _TOOLS[name] = importlib.import_module(name)
    else:
      assert (ROOT / name).is_file(), f'{name}: no such file'
      spec = importlib.util.spec_from_file_location(pathlib.Path(name).stem, ROOT / name)
      module = importlib.util.module_from_spec(spec)
      with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str((ROOT / name).parent))  # as when run: its folder importable
        spec.loader.exec_module(module)
      _TOOLS[name] = module
  return _TOOLS[name].main


def check_flags(name: str, args):
  """The tool's argument parser accepts `args`; `--config.*` extras and a `--config` file
  load as a config."""
  main = tool_main(name)
  with stop_after_parsing(), pytest.raises(Parsed) as parsed:
    status = main(list(args))
    pytest.fail(f'{name} {shlex.join(args)}: its arguments do not parse (status {status})')
  namespace, extras = parsed.value.namespace, parsed.value.extras
  overrides = [*getattr(namespace, 'overrides', []), *extras]
  assert all(flag.startswith('--config.') for flag in overrides), overrides
  if getattr(namespace, 'config', None) or overrides:
    config_lib.load(getattr(namespace, 'config', None) or 'configs/tiny.py', overrides)


def setup_extras() -> dict:
  tree = ast.parse((ROOT / 'setup.py').read_text())
  node = next(n for n in tree.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], 'id', '') == 'EXTRAS_REQUIRE')
  return ast.literal_eval(node.value)


def check_pip_install(args):
  """Every `.[extra,…]` installed is an extra of setup.py."""
  targets = [w for w in args if w == '.' or w.startswith('.[')]
  assert targets, f'pip install {shlex.join(args)}: expected moetrain itself (.[EXTRA])'
  for target in targets:
    wanted = target[2:-1].split(',') if target != '.' else []
    assert set(wanted) <= set(setup_extras()), f'{target}: no such extra in setup.py'


def train_commands(output: str) -> list[list[str]]:
  """The arguments of every `-m moetrain.train` in printed shell commands, nested command
  strings (ssh --command '…') included."""
  found = []
  def scan(line):
    argv = shlex.split(line)
    for i, word in enumerate(argv):
      if word == 'moetrain.train' and argv[i - 1] == '-m':
        rest = argv[i + 1:]
        stops = [j for j, w in enumerate(rest) if w in ('&', '&&', ';', '|', '>', '<', '2>&1')]
        found.append(rest[:stops[0]] if stops else rest)
      elif ' -m moetrain.train' in word:
        scan(word)
  for line in output.splitlines():
    if '-m moetrain.train' in line:
      scan(line)
  return found


def check_make(argv):
  """`make -n` prints the recipe; its python commands are checked as commands of their own."""
  env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
  result = subprocess.run(['make', '-n', *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  checked = 0
  for line in result.stdout.replace('\\\n', ' ').splitlines():
    recipe = shlex.split(line)
    while recipe and re.fullmatch(r'[A-Z_]+=.*', recipe[0]):  # VAR=value prefixes
      recipe = recipe[1:]
    if recipe[:3] == ['.venv/bin/python', '-m', 'pytest']:
      assert (ROOT / recipe[-1]).exists(), line
    elif recipe[:1] == ['.venv/bin/python']:
      check(recipe)
    else:
      continue  # make's own steps: venv, stamps
    checked += 1
  assert checked, f'{shlex.join(argv)}: no .venv/bin/python command in\n{result.stdout}'


def check_launcher(argv):
  """The launcher's dry run succeeds and every training command it prints is checked."""
  script, args = argv[0], argv[1:]
  cut = args.index('--') if '--' in args else len(args)
  result = subprocess.run(['bash', script, *args[:cut], '--dry-run', *args[cut:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  commands = train_commands(result.stdout)
  assert commands, result.stdout
  for train_args in commands:
    check_train(train_args)


def run_python_code(code: str, tmp_path):
  """Snippets read a run's files: a scratch directory holds runs/mine with six records."""
  workdir = tmp_path / 'runs' / 'mine'
  workdir.mkdir(parents=True)
  records = [{'step': step, 'loss': 9.0 - step} for step in range(1, 7)]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.strip(), result.stderr


def check(argv, expected='', tmp_path=None):
  how = kind(argv)
  assert how in HOW, (f'no check for `{shlex.join(argv)}`: add its kind {how!r} to HOW (and '
                      'say why it is not run), or fix the command')
  if expected and how != 'moetrain.train':
    pytest.fail(f'{how}: printed output is checked for training commands only')
  if how.startswith('make '):
    check_make(argv)
  elif how == 'moetrain.train':
    check_train(argv[3:], expected)
  elif how.startswith(('moetrain.', 'tools/')):
    check_flags(how, argv[3:] if how.startswith('moetrain.') else argv[2:])
  elif how == 'pip install':
    check_pip_install(argv[argv.index('install') + 1:])
  elif how == 'tensorboard':
    assert any(r.startswith('tensorboard==') for r in setup_extras()['tensorboard'])
  elif how.startswith('launch/'):
    check_launcher(argv)
  elif how == '... -- TRAIN_ARGS':
    check_train(argv[2:])
  elif how == '--config.* overrides':
    config_lib.load('configs/tiny.py', argv)
  elif how == 'python -c':
    run_python_code(argv[2], tmp_path)
  else:
    pytest.fail(f'{how}: in HOW but without a check')


# --- the tests --------------------------------------------------------------------------


def test_the_docs_hold_commands():
  assert len(COMMANDS) > 40
  for name in ('README.md', 'docs/train.md', 'docs/data.md', 'docs/scale_out.md'):
    assert any(c.doc.startswith(name + ':') for c in COMMANDS), name


@pytest.mark.parametrize('command', COMMANDS, ids=[c.doc for c in COMMANDS])
def test_command(command, tmp_path):
  check(words(command.text), command.expected, tmp_path)


def test_every_kind_in_how_is_used():
  used = {kind(words(c.text)) for c in COMMANDS}
  assert set(HOW) - used == set(), 'HOW lists kinds no doc command has'


@pytest.mark.parametrize('text, fragment', [
    ('.venv/bin/python -m moetrain.train --config configs/nonexistent.py --workdir w',
     'nonexistent.py'),
    ('.venv/bin/python -m moetrain.train --config configs/tiny.py --workdir w '
     '--config.model.moe.no_such_field=1', 'no_such_field'),
    ('.venv/bin/python -m moetrain.train --config configs/tiny.py --workdir w --bogus_flag',
     '--bogus_flag'),
    ('.venv/bin/python tools/no_such_tool.py', 'no_such_tool.py'),
    ('.venv/bin/python tools/convert_checkpoint.py hf-to-moetrain a b --bogus', '--bogus'),
    ('.venv/bin/python tools/benchmark.py train --config configs/tiny.py --config.train.nope=1',
     'nope'),
    ('.venv/bin/pip install -e .[no_such_extra]', 'no_such_extra'),
    ("make train ARGS='--config.train.stesp=50'", 'stesp'),
    ('launch/tpu_pod.sh --zone z -- --config configs/tiny.py --workdir w', '--name is missing'),
    ('python -m moetrain.train --config configs/tiny.py --workdir w', 'no check for'),
])
def test_a_broken_command_fails(text, fragment, tmp_path):
  """The checks catch a wrong path, a missing file, an unknown flag or field."""
  with pytest.raises((AssertionError, ConfigError, SystemExit, pytest.fail.Exception)) as error:
    check(words(text), tmp_path=tmp_path)
  assert fragment in str(error.value)


def test_no_code_block_escapes_the_checks():
  """Shell and plain blocks are read above; Python blocks must at least compile."""
  for path in DOCS:
    for language, line, lines in _blocks(path.read_text(encoding='utf-8')):
      assert language in ('sh', 'bash', '', 'python'), f'{path.name}:{line}: ```{language}'
      if language == 'python':
        compile('\n'.join(lines), f'{path.name}:{line}', 'exec')


def test_paths_the_docs_name_exist():
  """Files named in backticks (configs/…, tools/…) and relative links point at something."""
  missing = []
  for path in DOCS:
    text = path.read_text(encoding='utf-8')
    for span in re.findall(r'`([^`\n]+)`', text):
      name = re.split(r'::|:\s|\s', span)[0].rstrip('/')
      if re.match(r'(configs|tools|launch|moetrain|docs|tests)/', name) and not any(
          ROOT.glob(name)):
        missing.append(f'{path.name}: {name}')
    for link in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', text):
      if not (path.parent / link).exists():
        missing.append(f'{path.name}: {link}')
  assert missing == []
