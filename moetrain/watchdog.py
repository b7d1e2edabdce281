"""A hung step is caught: a thread that expects the training loop to come round again within
`train.step_timeout_s`, and otherwise writes every thread's Python stack into the workdir and
ends the process with one line.

A stuck collective, a data reader that blocks or a device that stops answering all look the
same from the host: the loop stops coming round. The loop reports each step it finishes
(`beat`); the first one is left out (it compiles). `auto` waits `AUTO_FACTOR` times the median
of the steps measured so far, never less than `AUTO_FLOOR_S`, so an eval or a checkpoint that
takes a few steps' time is not mistaken for a hang. The thread cannot raise into a main thread
that is stuck in C++, so it ends the process itself (`os._exit`), after the dump.
"""

import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time

from moetrain import paths

AUTO_FACTOR = 10
AUTO_FLOOR_S = 300.0
# Test-only fault injection, off unless set: the loop blocks before fetching this step's batch.
HANG_ENV = 'MOETRAIN_FAULT_HANG_AT_STEP'


def timeout_from(value: str) -> float | None:
  """`train.step_timeout_s` as seconds, or None for 'auto'; ValueError for anything else."""
  if value == 'auto':
    return None
  seconds = float(value)
  if not seconds > 0:
    raise ValueError(value)
  return seconds


class StepWatchdog:
  """Ends the process when no step finishes for the timeout (`timeout_s`, None: auto).

  `dump_dir` receives the stacks; `last_saved()` gives the newest saved step (or None) for
  the error line.
  """

  def __init__(self, timeout_s: float | None, dump_dir, last_saved, *, poll_s: float = 1.0):
    self.fixed, self.dump_dir, self.last_saved, self.poll_s = timeout_s, dump_dir, last_saved, poll_s
    self.step, self.last, self.durations = None, None, []
    self.stopped = threading.Event()
    self.thread = threading.Thread(target=self._watch, name='step-watchdog', daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.stopped.set()
    self.thread.join()

  def beat(self, step: int) -> None:
    """Step `step` has finished (with its periodic actions)."""
    now = time.monotonic()
    if self.last is not None:
      self.durations.append(now - self.last)
    self.step, self.last = step, now

  def timeout_s(self) -> float | None:
    """The current limit; None until a step has been measured after the first."""
    if self.fixed is not None:
      return self.fixed if self.last is not None else None
    if not self.durations:
      return None
    return max(AUTO_FLOOR_S, AUTO_FACTOR * statistics.median(self.durations))

  def _watch(self) -> None:
    while not self.stopped.wait(self.poll_s):
      limit = self.timeout_s()
      if limit is not None and time.monotonic() - self.last > limit:
        self._give_up(limit)

  def _give_up(self, limit: float) -> None:
    where = self._dump()
    saved = self.last_saved()
    # On a line of its own: the progress bar may be mid-line.
    print(f'\nmoetrain: error: step {self.step + 1} has not finished {limit:.0f} s after step '
          f'{self.step} (train.step_timeout_s); every thread\'s stack is in {where}; '
          + (f'the last saved step is {saved}' if saved is not None else 'no step was saved'),
          file=sys.stderr, flush=True)
    os._exit(1)

  def _dump(self):
    """Every thread's Python stack, written into `dump_dir` (local or an object store)."""
    with tempfile.TemporaryFile('w+') as file:
      faulthandler.dump_traceback(file, all_threads=True)
      file.seek(0)
      text = file.read()
    target = paths.resolve(str(self.dump_dir)) / f'stacks-step{self.step + 1}-{os.getpid()}.txt'
    paths.write_text(target, text)
    return target


def injected_hang(step: int) -> None:
  """Blocks forever at `step` when the test-only fault injection asks for it."""
  if os.environ.get(HANG_ENV) == str(step):
    print(f'moetrain: fault injection: step {step} hangs', file=sys.stderr, flush=True)
    threading.Event().wait()
