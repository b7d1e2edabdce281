"""The training loop: one jitted step after another, each followed by the periodic actions
(hooks) that log, evaluate, checkpoint, profile and count non-finite steps.

A hook is called as `hook(step, state, metrics)` after every step, in a fixed order, and acts
only on the steps that concern it. The loop's summary dict is shared with the hooks, each
filling in its own fields.
"""

import time

import jax
import numpy as np

from moetrain import hardware, summary as summary_lib, watchdog
from moetrain.state import Setup
from moetrain.steps import make_eval_step, make_train_step


def global_batch(setup: Setup, local_batch: dict) -> dict:
  """This process's rows → one global jax.Array per field, sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(setup: Setup, eval_step, state, local_batches) -> float:
  """Mean cross-entropy per target token over the given eval batches."""
  total, count = 0.0, 0.0
  for local_batch in local_batches:
    loss_sum, tokens = eval_step(state['params'], state['buffers'],
                                 global_batch(setup, local_batch))
    total, count = total + float(loss_sum), count + float(tokens)
  return total / max(count, 1.0)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Window:
  """The steps run and the time since the last restart: what tokens/s is measured over."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def tick(self) -> None:
    self.steps += 1


class ProfileHook:
  """Traces the steps in `steps` (a range) with the JAX profiler into `directory`."""

  def __init__(self, steps: range, directory):
    self.steps, self.directory, self.active = steps, directory, False

  def before(self, step: int) -> None:
    """Starts the trace ahead of the window's first step."""
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def __call__(self, step: int, state, metrics) -> None:
    if self.active and step == self.steps[-1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (the loop ended inside the window, or raised)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class NonFiniteHook:
  """Counts the skipped (non-finite) steps into `summary['skipped_steps']`; `limit` of them in
  a row raise NonFiniteError."""

  def __init__(self, limit: int, summary: dict):
    self.limit, self.summary, self.streak, self.pending = limit, summary, 0, None

  def __call__(self, step: int, state, metrics) -> None:
    # Reading the previous step's flag lets this step run meanwhile.
    if self.pending is not None:
      self._count(self.pending, step - 1)
    self.pending = metrics['skipped']

  def finish(self, state) -> None:
    """Counts the last step's flag, once the loop has ended."""
    if self.pending is not None:
      self._count(self.pending, int(state['step']))

  def _count(self, skipped, step: int) -> None:
    if not int(skipped):
      self.streak = 0
      return
    self.summary['skipped_steps'] += 1
    if self.streak + 1 >= self.limit:
      raise NonFiniteError(f'{self.streak + 1} consecutive steps up to step {step} had a '
                           f'non-finite loss or gradient (train.max_nonfinite_steps='
                           f'{self.limit}); the updates were skipped and the last checkpoint '
                           'holds the last good state')
    self.streak += 1


class LogHook:
  """Writes the train metrics every `train.log_every` steps and at the end, with tokens/s
  (and MFU, where the chip's peak is known) over the steps since the last write; records the
  first and latest logged loss and their steps in `summary`."""

  def __init__(self, setup: Setup, writer, progress, summary: dict, window: Window):
    t = setup.config.train
    self.train_config, self.writer, self.progress = t, writer, progress
    self.summary, self.window = summary, window
    self.compiled = False
    self.tokens_per_step = t.batch_size * t.seq_len
    chip = hardware.chip_for_device(jax.devices()[0].device_kind)
    # Model FLOPs per second of all devices over their datasheet peak, where the peak is known.
    self.mfu_per_token = (summary_lib.flops_per_token(setup.config.model, t.seq_len)
                          / (jax.device_count() * chip.peak_flops) if chip else None)

  def __call__(self, step: int, state, metrics) -> None:
    t, window = self.train_config, self.window
    window.tick()
    if not self.compiled:
      self.compiled = True
      window.restart()  # leave compilation out of tokens/s
    if step % t.log_every and step != t.steps:
      return
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - window.start
    if window.steps:
      metrics['tokens_per_sec'] = self.tokens_per_step * window.steps / elapsed
      if self.mfu_per_token:
        metrics['mfu'] = metrics['tokens_per_sec'] * self.mfu_per_token
    record = self.writer.write(step, metrics)
    if self.summary['first_loss'] is None:
      self.summary['first_loss'], self.summary['first_logged_step'] = record['loss'], step
    self.summary['loss'], self.summary['logged_step'] = record['loss'], step
    self.summary['tokens_per_sec'] = record.get('tokens_per_sec')
    if self.progress is not None:
      self.progress.set_postfix(loss=f'{record["loss"]:.3f}',
                                tok_s=f'{record.get("tokens_per_sec", 0):,.0f}', refresh=False)
    window.restart()


class EvalHook:
  """Evaluates on `eval_batches` every `train.eval_every` steps and at the end, writing the
  loss and recording it in `summary`; its time is left out of tokens/s."""

  def __init__(self, setup: Setup, eval_batches, writer, progress, summary: dict,
               window: Window):
    self.setup, self.batches, self.writer, self.progress = setup, eval_batches, writer, progress
    self.summary, self.window = summary, window
    self.eval_step = make_eval_step(setup)

  def __call__(self, step: int, state, metrics) -> None:
    t = self.setup.config.train
    if not (self.batches and t.eval_every and (step % t.eval_every == 0 or step == t.steps)):
      return
    eval_loss = evaluate(self.setup, self.eval_step, state, self.batches)
    self.writer.write(step, {'loss': eval_loss}, split='eval')
    self.summary['eval_loss'] = eval_loss
    if self.summary['first_eval_loss'] is None:
      self.summary['first_eval_loss'] = eval_loss
    if self.progress is not None:
      self.progress.write(f'step {step}: eval loss {eval_loss:.3f}')
    self.window.restart()


class CheckpointHook:
  """Saves every `train.checkpoint_every` steps, at the end, and when `stop_requested(step)`
  turns true (preemption), which also records the step in `summary['stopped_at']`."""

  def __init__(self, train_config, save, stop_requested, summary: dict):
    self.train_config, self.save, self.stop_requested = train_config, save, stop_requested
    self.summary = summary

  def __call__(self, step: int, state, metrics) -> None:
    t = self.train_config
    stop = self.stop_requested is not None and self.stop_requested(step)
    if self.save is not None and (stop or step == t.steps
                                  or (t.checkpoint_every and step % t.checkpoint_every == 0)):
      self.save(step, state)
    if stop:
      self.summary['stopped_at'] = step


def train_loop(setup: Setup, state, train_iter, eval_batches, writer, progress=None, *,
               save=None, stop_requested=None, trace_dir=None, finished=None):
  """Runs steps up to `config.train.steps` with logging, eval and checkpoints.

  `progress`, if given, is a tqdm-like bar advanced once per step. `save(step, state)` starts a
  checkpoint every `train.checkpoint_every` steps and at the end; when `stop_requested(step)`
  turns true (preemption), the loop saves and ends early. Steps with a non-finite loss or
  gradient leave the state unchanged and are counted; `train.max_nonfinite_steps` of them in
  a row raise NonFiniteError. With `train.profile_steps` = n and a `trace_dir`, this run's
  steps 2 … n+1 (the first compiles) are traced with the JAX profiler into `trace_dir`, where
  TensorBoard's profile plugin finds them. `finished(step)`, if given, is told when each step
  and its periodic actions are done (`watchdog.StepWatchdog.beat`). Returns (state, summary).
  """
  t = setup.config.train
  train_step = make_train_step(setup)
  summary = {'first_loss': None, 'first_logged_step': None, 'loss': None, 'logged_step': None,
             'eval_loss': None, 'first_eval_loss': None, 'skipped_steps': 0, 'stopped_at': None}
  start_step = int(state['step'])
  window = Window()
  profile = ProfileHook(range(start_step + 2, start_step + 2 + t.profile_steps) if trace_dir
                        else range(0), trace_dir)
  non_finite = NonFiniteHook(t.max_nonfinite_steps, summary)
  hooks = [profile, non_finite, LogHook(setup, writer, progress, summary, window),
           EvalHook(setup, eval_batches, writer, progress, summary, window)]
  if progress is not None:
    hooks.append(lambda step, state, metrics: progress.update(1))
  hooks.append(CheckpointHook(t, save, stop_requested, summary))
  if finished is not None:
    hooks.append(lambda step, state, metrics: finished(step))
  try:
    for step in range(start_step + 1, t.steps + 1):
      profile.before(step)
      watchdog.injected_hang(step)
      state, metrics = train_step(state, global_batch(setup, next(train_iter)))
      for hook in hooks:
        hook(step, state, metrics)
      if summary['stopped_at'] is not None:
        break
    non_finite.finish(state)
  finally:
    profile.close()
  return state, summary
