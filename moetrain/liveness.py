"""A lost process stops the job: in a multi-process run every process beats a counter in JAX's
coordination service and watches the others' counters; one that stops moving for
`train.heartbeat_timeout_s` is lost, and every process that notices ends itself with one line
naming it and the last saved step.

Without this, a process killed mid-collective leaves the others blocked in it until JAX's own
heartbeat check aborts them with a C++ log (SIGABRT) a minute or more later. Here the
coordination service's heartbeat is set to a multiple of ours (`jax_heartbeat_s`), so this
check always speaks first, and the process exits with status 1 (`os._exit`: the main thread
may be stuck in a collective that never returns). A collective may instead fail at once when
its peer's connection closes; an error leaving the watch therefore waits up to the timeout
for the watch to name the lost peer before it is reported. When the others lose the
coordination service (it lives in process 0) while process 0 still runs, their calls to it fail
and that is reported the same way. When process 0 itself dies, JAX's client in every other
process polls the service for errors, finds its connection closed and aborts the process at
once (SIGABRT, a C++ log) before this watch can speak; JAX offers no public hook to change that.
"""

import os
import sys
import threading
import time

HEARTBEAT_FLOOR_S = 10.0  # below this a garbage-collection pause or a slow save reads as lost
JAX_HEARTBEAT_FACTOR = 3
_DIRECTORY = 'moetrain/heartbeat/'
_KEY = _DIRECTORY + '{}'
_FAILING = 'failing'  # appended to the beat of a process leaving the watch with an error


def check_timeout(seconds: float) -> None:
  """ValueError unless `seconds` is at least the floor."""
  if not seconds >= HEARTBEAT_FLOOR_S:
    raise ValueError(seconds)


def jax_heartbeat_s(timeout_s: float) -> int:
  """The coordination service's own heartbeat timeout: well behind ours."""
  return int(JAX_HEARTBEAT_FACTOR * timeout_s)


class PeerWatch:
  """Beats this process's counter and watches every other process's, from a thread.

  `last_saved()` gives the newest saved step (or None) for the line printed when a peer is lost.
  """

  def __init__(self, process_id: int, num_processes: int, timeout_s: float, last_saved, *,
               interval_s: float = 1.0, client=None):
    self.me, self.timeout_s, self.last_saved = process_id, timeout_s, last_saved
    self.peers = [p for p in range(num_processes) if p != process_id]
    self.interval_s, self.client = interval_s, client
    self.stopped = threading.Event()
    self.failing = threading.Event()  # this process leaves the watch with an error
    self.decided = threading.Event()  # ... and so does every peer (a lost one ends the process)
    self.thread = threading.Thread(target=self._watch, name='peer-watch', daemon=True)

  def __enter__(self):
    if self.peers:
      from moetrain import jax_compat  # imports JAX, which config validation does without
      self.client = self.client or jax_compat.coordination_client()
      self.thread.start()
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None and issubclass(exc_type, Exception) and self.thread.is_alive():
      # A collective with a lost peer fails at once (e.g. "connection closed by peer"): the
      # watch gets its full timeout to name the peer before the error itself is reported,
      # unless every peer says it fails too (the same error everywhere, e.g. a NaN loss).
      # An interrupt (KeyboardInterrupt, SystemExit) goes at once.
      self.failing.set()
      self.decided.wait(self.timeout_s + 2 * self.interval_s)
    self.stopped.set()
    if self.thread.is_alive():
      self.thread.join()

  def _watch(self) -> None:
    beats = 0
    now = time.monotonic()
    seen = {peer: (None, now) for peer in self.peers}  # last counter read, when it moved
    unreachable_since = None
    while not self.stopped.wait(self.interval_s):
      now = time.monotonic()
      try:
        beats += 1
        beat = f'{beats} {_FAILING}' if self.failing.is_set() else str(beats)
        self.client.key_value_set(_KEY.format(self.me), beat, allow_overwrite=True)
        # One read of every beat: a process of a large job must not ask once per peer.
        beats_by_key = dict(self.client.key_value_dir_get(_DIRECTORY))
        for peer in self.peers:
          value = beats_by_key.get(_KEY.format(peer))  # None: a peer still starting up
          if value != seen[peer][0]:
            seen[peer] = (value, now)
        unreachable_since = None
        if self.failing.is_set() and all(str(value).endswith(_FAILING)
                                         for value, _ in seen.values()):
          self.decided.set()
      except Exception:  # the coordination service does not answer
        unreachable_since = unreachable_since or now
        if now - unreachable_since > self.timeout_s:
          self._give_up(0, 'the coordination service it hosts stopped answering')
        continue
      for peer, (_, moved) in seen.items():
        if now - moved > self.timeout_s:
          self._give_up(peer, f'no heartbeat for {self.timeout_s:.0f} s')

  def _give_up(self, peer: int, why: str) -> None:
    try:
      saved = self.last_saved()
    except Exception:  # the line matters more than the step
      saved = None
    # On a line of its own: the progress bar may be mid-line.
    print(f'\nmoetrain: error: lost process {peer} ({why}; train.heartbeat_timeout_s); '
          + (f'the last saved step is {saved}' if saved is not None else 'no step was saved')
          + '; rerun to resume', file=sys.stderr, flush=True)
    os._exit(1)
