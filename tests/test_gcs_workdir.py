"""A run whose workdir is a `gs://` bucket, against a local GCS emulator on loopback: config,
metrics, TensorBoard events and checkpoints land in the bucket, a killed run resumes from it,
and documents and tokenizer are read from it."""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from tensorboardX.proto import event_pb2

from moetrain.data.tokenizer import train_tokenizer
from tests.devices import free_port, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_layers=2',
         '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.log_every=1',
         '--config.train.eval_every=0', '--config.train.sample_tokens=0',
         '--config.train.checkpoint_every=2', '--config.train.warmup_steps=2']


@pytest.fixture
def bucket():
  """A GCS emulator serving an empty bucket `bucket`; yields its URL."""
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, str(REPO / 'tests/gcs_emulator.py'), 'start', '--host', '127.0.0.1',
       '--port', str(port), '--default-bucket', 'bucket', '--in-memory', '--quiet'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/bucket', timeout=5).read()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, 'emulator did not start'
      time.sleep(0.2)
  yield url
  server.terminate()
  server.wait(timeout=30)


def objects(url: str, prefix: str) -> list[str]:
  query = urllib.parse.urlencode({'prefix': prefix})
  listing = json.load(urllib.request.urlopen(f'{url}/storage/v1/b/bucket/o?{query}'))
  return sorted(item['name'] for item in listing.get('items', []))


def download(url: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  return urllib.request.urlopen(f'{url}/download/storage/v1/b/bucket/o/{quoted}?alt=media').read()


def scalars(event_file: bytes, tag: str) -> dict[int, float]:
  """{step: value} of `tag` in a TensorBoard event file (TFRecords of Event protos)."""
  found, offset = {}, 0
  while offset < len(event_file):
    (length,) = struct.unpack('<Q', event_file[offset:offset + 8])
    event = event_pb2.Event.FromString(event_file[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      if value.tag == tag:
        found[event.step] = value.simple_value
  return found


def start(url, cwd, steps, *extra, workdir='gs://bucket/run'):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL='2', STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator')
  return subprocess.Popen(
      [sys.executable, '-m', 'moetrain.train', '--config', str(REPO / 'configs/tiny.py'),
       '--workdir', workdir, *SMALL, f'--config.train.steps={steps}', *extra],
      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpointed_steps(url) -> list[int]:
  """The finished checkpoints (in object storage Orbax marks a step finished by writing its
  `commit_success.txt` last)."""
  parts = [name.split('/') for name in objects(url, 'run/checkpoints/')]
  return sorted(int(p[2]) for p in parts if len(p) == 4 and p[3] == 'commit_success.txt')


def test_a_gs_workdir_holds_the_whole_run_and_a_killed_run_resumes_from_it(bucket, tmp_path):
  process = start(bucket, tmp_path, 10_000)
  while not checkpointed_steps(bucket):
    assert process.poll() is None, process.communicate()
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  reached = checkpointed_steps(bucket)[-1]
  resumed = start(bucket, tmp_path, reached + 2)
  stdout, stderr = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, stderr
  assert f"resuming from step {reached} of gs://bucket/run/checkpoints" in stderr, stderr
  assert checkpointed_steps(bucket)[-1] == reached + 2

  records = [json.loads(line) for line in download(bucket, 'run/metrics.jsonl').splitlines()]
  assert [r['step'] for r in records] == list(range(1, reached + 3))
  assert json.loads(download(bucket, 'run/config.json'))['train']['steps'] == reached + 2
  event_files = [name for name in objects(bucket, 'run/events.out.tfevents')]
  assert len(event_files) == 2  # one per run
  losses = scalars(download(bucket, event_files[-1]), 'train/loss')
  assert sorted(losses) == [reached + 1, reached + 2]
  assert losses[reached + 2] == pytest.approx(records[-1]['loss'])
  assert os.listdir(tmp_path) == []  # no local `gs:` folder, nothing else either


def upload(url: str, name: str, data: bytes) -> None:
  query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
  request = urllib.request.Request(f'{url}/upload/storage/v1/b/bucket/o?{query}', data=data,
                                   method='POST')
  urllib.request.urlopen(request).read()


def test_documents_and_tokenizer_are_read_from_the_bucket(bucket, tmp_path):
  texts = [f'def f{i}(x):\n    return x * {i} + {i % 7}\n' * (1 + i % 5) for i in range(400)]
  for shard in range(2):
    upload(bucket, f'data/shard-{shard}.jsonl', ''.join(
        json.dumps({'text': t}) + '\n' for t in texts[shard::2]).encode())
  train_tokenizer(texts, 300, tmp_path / 'tokenizer.model')
  upload(bucket, 'tokenizer.model', (tmp_path / 'tokenizer.model').read_bytes())
  process = start(bucket, tmp_path, 2, '--config.data.source=jsonl',
                  '--config.data.path=gs://bucket/data/*.jsonl',
                  '--config.data.tokenizer=gs://bucket/tokenizer.model',
                  '--config.model.vocab_size=300', workdir='gs://bucket/documents')
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr
  assert 'data: jsonl gs://bucket/data/*.jsonl' in stdout
  assert ('tokenizer: sentencepiece, 300 pieces (data.tokenizer=gs://bucket/tokenizer.model)'
          in stdout)
  records = [json.loads(line)
             for line in download(bucket, 'documents/metrics.jsonl').splitlines()]
  assert [r['step'] for r in records] == [1, 2]
