"""A lost process stops the job: the others end by themselves, with one line naming it and the
last saved step, well before JAX's own heartbeat check would abort them; a rerun on another
process count resumes, bit for bit."""

import json
import os
import subprocess
import sys
import time

import pytest

from moetrain import config as config_lib, liveness
from moetrain.data import sources
from moetrain.data.tokenizer import load_or_train_stdlib_tokenizer, stdlib_tokenizer_path
from moetrain.errors import ConfigError
from tests.test_launch import ROOT, TINY
from tests.devices import free_port, xla_flags


class FakeClient:
  """The coordination service's key-value store, in memory; peer 1 stops after `beats`, and
  says it is failing if `failing`."""

  def __init__(self, beats, failing=False):
    self.store, self.beats, self.failing, self.count = {}, beats, failing, 0

  def key_value_set(self, key, value, allow_overwrite=False):
    self.store[key] = value
    if self.count < self.beats:
      self.count += 1
      self.store['moetrain/heartbeat/1'] = f'{self.count} failing' if self.failing else str(
          self.count)

  def key_value_dir_get(self, directory):
    return [(key, value) for key, value in self.store.items() if key.startswith(directory)]


def lose_into(lost):
  """A `_give_up` that records the lost peer instead of ending the process."""
  def give_up(self, peer, why):
    lost.append((peer, why))
    self.decided.set()
    self.stopped.set()
  return give_up


def test_a_peer_whose_heartbeat_stops_is_lost(monkeypatch):
  lost = []
  monkeypatch.setattr(liveness.PeerWatch, '_give_up', lose_into(lost))
  watch = liveness.PeerWatch(0, 2, 0.3, lambda: 4, interval_s=0.02, client=FakeClient(10))
  with watch:
    started = time.monotonic()
    assert watch.stopped.wait(5)
  assert lost == [(1, 'no heartbeat for 0 s')]
  assert time.monotonic() - started > 0.3 + 10 * 0.02 * 0.5  # not before it went silent


def test_an_error_leaving_the_watch_waits_for_it_to_name_the_lost_peer(monkeypatch):
  lost = []
  monkeypatch.setattr(liveness.PeerWatch, '_give_up', lose_into(lost))
  client = FakeClient(5)
  watch = liveness.PeerWatch(0, 2, 0.3, lambda: 4, interval_s=0.02, client=client)
  with pytest.raises(RuntimeError, match='closed by peer'):
    with watch:
      while client.count < 5:  # the peer dies, then the collective fails
        time.sleep(0.01)
      raise RuntimeError('Gloo AllGather failed: Connection closed by peer')
  assert lost == [(1, 'no heartbeat for 0 s')]


def test_an_error_every_process_shares_is_reported_without_waiting_out_the_timeout(
    monkeypatch):
  lost = []
  monkeypatch.setattr(liveness.PeerWatch, '_give_up', lose_into(lost))
  client = FakeClient(10**6, failing=True)
  watch = liveness.PeerWatch(0, 2, 60, lambda: 4, interval_s=0.02, client=client)
  with pytest.raises(FloatingPointError):
    with watch:
      raise FloatingPointError('non-finite loss')
  assert watch.decided.is_set() and not lost
  assert client.store['moetrain/heartbeat/0'].endswith(' failing')


def test_an_interrupt_leaves_the_watch_at_once(monkeypatch):
  lost = []
  monkeypatch.setattr(liveness.PeerWatch, '_give_up', lose_into(lost))
  client = FakeClient(10**6)
  watch = liveness.PeerWatch(0, 2, 60, lambda: 4, interval_s=0.02, client=client)
  with pytest.raises(KeyboardInterrupt):
    with watch:
      raise KeyboardInterrupt
  assert not watch.failing.is_set() and not watch.thread.is_alive() and not lost


def test_a_heartbeat_timeout_below_the_floor_names_the_field():
  with pytest.raises(ConfigError, match=r'train.heartbeat_timeout_s=5.0 must be at least 10 s'):
    config_lib.load('configs/tiny.py', ['--config.train.heartbeat_timeout_s=5'])


def losses(workdir):
  return {r['step']: r['loss'] for r in map(json.loads, (workdir / 'metrics.jsonl').open())}


def test_killing_one_of_two_processes_stops_the_other_and_a_rerun_on_one_resumes(tmp_path):
  documents = tmp_path / 'documents.jsonl'  # jsonl documents, read by one global data path
  documents.write_text(''.join(json.dumps({'text': sources.read_text(file)}) + '\n'
                               for file in sources.stdlib_files('train')[:100]))
  load_or_train_stdlib_tokenizer(8000)
  # Steps enough that the kill, after step 3, lands mid-run and not in the job's shutdown.
  common = [*TINY, '--config.train.steps=16', '--config.train.checkpoint_every=2',
            '--config.train.heartbeat_timeout_s=10', '--config.data.source=jsonl',
            f'--config.data.path={documents}',
            f'--config.data.tokenizer={stdlib_tokenizer_path(8000)}']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  env.pop('MOETRAIN_DISTRIBUTED', None)
  one_process = dict(env, XLA_FLAGS=xla_flags(8))
  # The 1 × 8 runs join as a one-process job: its all-reduces then run on the same CPU
  # collectives (gloo) as the two processes', and add up in the same order.
  alone = ['--coordinator_address', f'127.0.0.1:{free_port()}', '--num_processes', '1',
           '--process_id', '0']
  # The uninterrupted run.
  whole = subprocess.run([sys.executable, '-m', 'moetrain.train', *common, *alone,
                          '--workdir', str(tmp_path / 'whole')], cwd=ROOT, env=one_process,
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-3000:]

  workdir, port = tmp_path / 'run', free_port()
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'moetrain.train', *common, '--workdir', str(workdir),
       '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2',
       '--process_id', str(i)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True, env=dict(env, XLA_FLAGS=xla_flags(4)))
      for i in range(2)]
  deadline = time.monotonic() + 300
  while 3 not in (losses(workdir) if (workdir / 'metrics.jsonl').exists() else {}):
    assert time.monotonic() < deadline and processes[0].poll() is None, 'no step 3'
    time.sleep(0.2)
  processes[1].kill()  # SIGKILL
  killed_at = time.monotonic()
  status = processes[0].wait(timeout=120)
  took = time.monotonic() - killed_at
  errors = [line for line in processes[0].stderr.read().splitlines()
            if line.startswith('moetrain: ')]
  processes[1].wait()
  assert 0 < status < 128 and took < 60, (status, took)
  assert len(errors) == 1 and errors[0].startswith('moetrain: error: lost process 1 '), errors
  saved = int(errors[0].split('the last saved step is ')[1].split(';')[0])
  assert saved in range(2, 16, 2), errors[0]  # a save every 2 steps, the kill before the last

  resumed = subprocess.run([sys.executable, '-m', 'moetrain.train', *common, *alone,
                            '--workdir', str(workdir)], cwd=ROOT, env=one_process,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from step {saved}' in resumed.stderr
  after = {step: loss for step, loss in losses(workdir).items() if step > saved}
  expected = {step: loss for step, loss in losses(tmp_path / 'whole').items() if step > saved}
  assert after.keys() == expected.keys() and after
  assert after == expected  # bit for bit
