"""Ctrl-C and SIGTERM at any moment of a run.

Start-up (imports, tokenizer training, compilation) is when a user notices a wrong flag, and
much of it runs in C++ where Python's own handlers wait for the call to return — a tokenizer
trains for most of a minute. So while `StartupGuard` is armed, a signal ends the process from a
watcher thread within milliseconds, with one line and status 128 + signal number. Nothing that
start-up writes is half-written by this: files are replaced atomically and Orbax lists only
finalised checkpoints. Disarmed (the training loop), the signal is left to the loop's own
handler, which saves and stops after the current step.

The handlers are installed explicitly, so a run started in the background with SIGINT ignored
(as shells and schedulers start jobs) still stops on SIGINT.
"""

import os
import signal
import socket
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum, frame):
  del signum, frame  # the watcher thread acts on it


class StartupGuard:
  """Context manager: armed from entry, `disarm()`ed around the training loop, `arm()`ed
  again after it."""

  BEFORE = 'before training started: stopped, no step run and no checkpoint written'
  AFTER = 'after training: stopped, every checkpoint complete'

  def __init__(self, stream=None):
    self.stream = stream
    self.armed = self.BEFORE
    self._previous = {}
    self._previous_fd = None
    self._reader = self._writer = None

  def __enter__(self):
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)
    self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, _ignore)
    self._thread = threading.Thread(target=self._watch, name='moetrain-startup-guard',
                                    daemon=True)
    self._thread.start()
    return self

  def _watch(self) -> None:
    while True:
      try:
        received = self._reader.recv(1)
      except OSError:
        return
      if not received:
        return
      # The wakeup fd hears every signal with a Python handler, not only these.
      if self.armed and received[0] in SIGNALS:
        name = signal.Signals(received[0]).name
        stream = self.stream or sys.stderr
        stream.write(f'moetrain: {name} {self.armed}\n')
        stream.flush()
        os._exit(128 + received[0])

  def disarm(self) -> None:
    """Leaves signals to the handler the caller installs (the training loop's)."""
    self.armed = None

  def arm(self, message: str) -> None:
    """Signals end the process again, with `moetrain: SIGNAL {message}`."""
    self.armed = message

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    signal.set_wakeup_fd(self._previous_fd)
    self._writer.close()  # the watcher reads end-of-file and returns
    self._thread.join(timeout=5)
    self._reader.close()
    return False
