"""tools/train_tokenizer.py: a tokenizer trained on any source, exact on held-out documents."""

import importlib.util
import json
import pathlib

from moetrain.data import sources
from moetrain.data.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('train_tokenizer',
                                              ROOT / 'tools' / 'train_tokenizer.py')
TOOL = importlib.util.module_from_spec(spec)
spec.loader.exec_module(TOOL)


def test_unigram_tokenizer_from_jsonl_round_trips_held_out_documents(tmp_path, capsys):
  corpus = tmp_path / 'code.jsonl'
  with corpus.open('w') as out:
    for file in sources.stdlib_files('train')[:150]:
      out.write(json.dumps({'body': sources.read_text(file)}) + '\n')
  model = tmp_path / 'tok.model'
  code = TOOL.main(['--config', 'configs/tiny.py', '--output', str(model), '--vocab_size',
                    '1000', '--model_type', 'unigram', '--config.data.source=jsonl',
                    f'--config.data.path={corpus}', '--config.data.text_field=body'])
  out = capsys.readouterr().out
  assert code == 0, out
  tokenizer = load_tokenizer(model)
  assert tokenizer.vocab_size() == 1000
  report = out.strip().splitlines()[-1]
  exact, total = report.split(': ')[1].split(' held-out')[0].split('/')
  assert exact == total and int(total) > 0  # byte fallback: every document round-trips
  text = 'def f(x):\n\treturn "ünïcode ✓"  \r\n'
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  code = TOOL.main(['--config', 'configs/tiny.py', '--output', str(tmp_path / 't.model'),
                    '--config.data.source=jsonl', f'--config.data.path={tmp_path}/none.jsonl'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'none.jsonl' in err[0]
  assert not (tmp_path / 't.model').exists()
  code = TOOL.main(['--config', 'configs/tiny.py', '--output', 'x', '--bogus'])
  assert code == 2 and '--bogus' in capsys.readouterr().err
