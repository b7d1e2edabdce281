"""Train state, the jitted train and eval steps, and the training loop.

The state is a plain dict `{'step', 'params', 'buffers', 'opt_state', 'rng'}` of (sharded)
arrays: `params` are the model's `nnx.Param`s (what the optimizer updates), `buffers` its other
variables (the routers' balancing biases, updated by the forward pass itself), `rng` the key
data every step's randomness is folded from. Both are pure
dicts merged back into the Flax NNX module inside each jitted step, so nothing Python-side
runs per step.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moetrain import hardware, summary as summary_lib
from moetrain.data.packing import document_segments
from moetrain.data.tokenizer import EOS_ID, PAD_ID
from moetrain.models.transformer import STAT_SHAPES, Transformer
from moetrain.parallel import sharding


# Per-MoE-layer statistics reported as they are, one entry per layer.
LAYER_METRICS = tuple(name for name in STAT_SHAPES if name not in ('aux_loss', 'z_loss'))


def build_model(model_config, seed: int, remat: str = 'none') -> Transformer:
  """The model with its parameters; under `init_state`'s jit they are created sharded."""
  return Transformer(model_config, rngs=nnx.Rngs(params=seed), remat=remat)


def make_optimizer(train_config):
  """AdamW with warmup + cosine (or constant) schedule; no decay on norms and biases."""
  t = train_config
  if t.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.min_lr_ratio)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
         optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
  adamw = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay,
                      mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw
  return tx, schedule


def decay_mask(params):
  """True for weights that get weight decay: not norm scales, not biases."""
  def decays(path, _):
    name = str(getattr(path[-1], 'key', path[-1]))
    return name != 'scale' and not name.endswith('bias')
  return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: the model's graph, optimizer, mesh and shardings."""
  config: object
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: object
  state_shardings: dict
  batch_sharding: jax.sharding.NamedSharding


def make_setup(config, mesh) -> Setup:
  """Derives the state shardings from the parameters' logical axes, without allocating them."""
  abstract = nnx.eval_shape(lambda: build_model(config.model, config.train.seed,
                                                 config.train.remat))
  graphdef, abstract_params, abstract_buffers = nnx.split(abstract, nnx.Param, ...)
  param_shardings = sharding.param_shardings(abstract_params, mesh)
  tx, schedule = make_optimizer(config.train)
  abstract_params = nnx.to_pure_dict(abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {'step': replicated, 'params': param_shardings,
                     'buffers': sharding.param_shardings(abstract_buffers, mesh),
                     'opt_state': opt_shardings, 'rng': replicated}
  return Setup(config, mesh, graphdef, tx, schedule, state_shardings,
               sharding.batch_sharding(mesh))


def fresh_weights(setup: Setup):
  """(params, buffers) of a random initialisation, created in the state's shardings."""
  def init():
    model = build_model(setup.config.model, setup.config.train.seed, setup.config.train.remat)
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  shardings = (setup.state_shardings['params'], setup.state_shardings['buffers'])
  return jax.jit(init, out_shardings=shardings)()


def init_state(setup: Setup, weights=None) -> dict:
  """Creates the train state directly in its shardings (never whole on one device).

  `weights` = (params, buffers) in the state's shardings (a warm start) replace the random
  initialisation; the optimizer, step and RNG start fresh either way.
  """
  params, buffers = fresh_weights(setup) if weights is None else weights

  def init(params, buffers):
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'buffers': buffers,
            'opt_state': setup.tx.init(params),
            'rng': jax.random.key_data(jax.random.key(setup.config.train.seed))}
  return jax.jit(init, out_shardings=setup.state_shardings)(params, buffers)


def abstract_state(setup: Setup) -> dict:
  """The train state as jax.ShapeDtypeStructs carrying its shardings (a restore target)."""
  shapes = jax.eval_shape(lambda: init_state(setup))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=sharding),
                      shapes, setup.state_shardings)


def loss_and_metrics(model, batch, model_config, capacity_factor, *, train=False, rng=None,
                     document_mask=True):
  """Cross-entropy over non-padding targets plus the weighted router losses.

  With `document_mask` the documents packed into a row attend only within themselves, each
  from position 0 (segments and positions from their end-of-document tokens, `data.packing`);
  without it every token attends to the whole row before it. Returns (objective, metrics);
  `loss` in metrics is the cross-entropy alone.
  """
  inputs_BxL, targets_BxL = batch['inputs'], batch['targets']
  segments_BxL, positions_BxL = (document_segments(inputs_BxL, EOS_ID) if document_mask
                                 else (None, None))
  logits_BxLxV, stats = model.forward(inputs_BxL, inputs_BxL != PAD_ID, capacity_factor,
                                      train=train, rng=rng, segments_BxL=segments_BxL,
                                      positions_BxL=positions_BxL)
  weights_BxL = (targets_BxL != PAD_ID).astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  tokens = jnp.maximum(weights_BxL.sum(), 1.0)
  ce = (ce_BxL * weights_BxL).sum() / tokens
  moe = model_config.moe
  aux, z = stats['aux_loss'].sum(), stats['z_loss'].sum()
  objective = ce + moe.aux_loss_weight * aux + moe.z_loss_weight * z
  metrics = {'loss': ce, 'total_loss': objective, 'aux_loss': aux, 'z_loss': z,
             'aux_loss_per_layer': stats['aux_loss'], 'z_loss_per_layer': stats['z_loss'],
             **{name: stats[name] for name in LAYER_METRICS}, 'tokens': weights_BxL.sum()}
  return objective, metrics


def gradients(setup: Setup, params, buffers, batch, rng):
  """Gradients of the training objective, the step's metrics and the updated buffers.

  With `train.microbatches = k > 1` the batch runs as k microbatches in a `lax.scan`, the
  balancing biases threaded through them. The cross-entropy and z-loss are token-weighted, so
  they and their gradients equal one pass over the whole batch; the aux loss is the mean of the
  per-microbatch values (MoE spec).
  """
  model_config = setup.config.model
  k = setup.config.train.microbatches

  def objective(params):
    model = nnx.merge(setup.graphdef, params, buffers)
    loss, metrics = loss_and_metrics(model, batch, model_config,
                                     model_config.moe.capacity_factor, train=True, rng=rng,
                                     document_mask=setup.config.train.document_mask)
    return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
  if k == 1:
    grads, (metrics, new_buffers) = jax.grad(objective, has_aux=True)(params)
    return grads, metrics, new_buffers
  return _accumulated_gradients(setup, params, buffers, batch, rng, k)


def split_microbatches(batch, k: int, group_size: int, mesh=None):
  """[B, L] → [k, B/k, L] per field, microbatch i holding dispatch groups i, i+k, i+2k, ...

  The batch is sharded over its rows, so every device's contiguous share of groups splits
  evenly over the k microbatches and each microbatch stays sharded the same way: the reshape
  moves no data between devices.
  """
  def split(x_BxL):
    b, l = x_BxL.shape
    x = x_BxL.reshape(b // (k * group_size), k, group_size, l).transpose(1, 0, 2, 3)
    x = x.reshape(k, b // k, l)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
              None, *sharding.batch_sharding(mesh).spec)))
    return x
  return {name: split(x) for name, x in batch.items()}


def _accumulated_gradients(setup: Setup, params, buffers, batch, rng, k: int):
  model_config = setup.config.model
  moe = model_config.moe
  targets = jnp.maximum((batch['targets'] != PAD_ID).sum().astype(jnp.float32), 1.0)
  routed = jnp.maximum((batch['inputs'] != PAD_ID).sum().astype(jnp.float32), 1.0)
  micro = split_microbatches(batch, k, moe.group_size, setup.mesh)

  def objective(params, buffers, mb, mb_rng):
    model = nnx.merge(setup.graphdef, params, buffers)
    _, metrics = loss_and_metrics(model, mb, model_config, moe.capacity_factor, train=True,
                                  rng=mb_rng, document_mask=setup.config.train.document_mask)
    # Shares of the whole batch: CE and z over its tokens, aux as a mean over microbatches.
    ce = metrics['loss'] * metrics['tokens'] / targets
    z_layers = metrics['z_loss_per_layer'] * (mb['inputs'] != PAD_ID).sum() / routed
    aux_layers = metrics['aux_loss_per_layer'] / k
    total = ce + moe.aux_loss_weight * aux_layers.sum() + moe.z_loss_weight * z_layers.sum()
    parts = {'loss': ce, 'aux_loss_per_layer': aux_layers, 'z_loss_per_layer': z_layers,
             'tokens': metrics['tokens'],
             **{name: metrics[name] / k for name in LAYER_METRICS}}
    new_buffers = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    return total, (parts, new_buffers)

  def body(carry, xs):
    grads, buffers = carry
    mb, index = xs
    mb_rng = jax.random.fold_in(rng, index)
    mb_grads, (parts, buffers) = jax.grad(objective, has_aux=True)(params, buffers, mb, mb_rng)
    return (jax.tree.map(jnp.add, grads, mb_grads), buffers), parts

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, new_buffers), parts = jax.lax.scan(body, (zeros, buffers), (micro, jnp.arange(k)))
  parts = jax.tree.map(lambda x: x.sum(axis=0), parts)
  aux, z = parts['aux_loss_per_layer'].sum(), parts['z_loss_per_layer'].sum()
  metrics = {'loss': parts['loss'],
             'total_loss': parts['loss'] + moe.aux_loss_weight * aux + moe.z_loss_weight * z,
             'aux_loss': aux, 'z_loss': z, **parts}
  return grads, metrics, new_buffers


def make_train_step(setup: Setup):
  """jit(state, batch) → (state, metrics), with explicit in/out shardings; state donated."""

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    grads, metrics, buffers = gradients(setup, state['params'], state['buffers'], batch, rng)
    updates, opt_state = setup.tx.update(grads, state['opt_state'], state['params'])
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = setup.schedule(state['step'])
    updated = {'params': optax.apply_updates(state['params'], updates), 'buffers': buffers,
               'opt_state': opt_state}
    # A non-finite loss or gradient leaves params, buffers and moments as they were.
    finite = jnp.isfinite(metrics['total_loss']) & jnp.isfinite(metrics['grad_norm'])
    metrics['skipped'] = (~finite).astype(jnp.int32)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                        {name: state[name] for name in updated})
    return {**kept, 'step': state['step'] + 1, 'rng': state['rng']}, metrics

  batch_shardings = {'inputs': setup.batch_sharding, 'targets': setup.batch_sharding}
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def make_eval_step(setup: Setup):
  """jit(params, buffers, batch) → (sum of cross-entropy, number of target tokens)."""
  model_config = setup.config.model

  def eval_step(params, buffers, batch):
    model = nnx.merge(setup.graphdef, params, buffers)
    _, metrics = loss_and_metrics(model, batch, model_config,
                                  model_config.moe.eval_capacity_factor,
                                  document_mask=setup.config.train.document_mask)
    return metrics['loss'] * metrics['tokens'], metrics['tokens']

  batch_shardings = {'inputs': setup.batch_sharding, 'targets': setup.batch_sharding}
  return jax.jit(eval_step, in_shardings=(setup.state_shardings['params'],
                                          setup.state_shardings['buffers'], batch_shardings),
                 out_shardings=sharding.replicated(setup.mesh))


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


class _Trace:
  """Traces the steps in `steps` (a range) with the JAX profiler into `directory`."""

  def __init__(self, steps: range, directory):
    self.steps, self.directory, self.active = steps, directory, False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.steps[-1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def train_loop(setup: Setup, state, train_iter, eval_batches, writer, progress=None, *,
               save=None, stop_requested=None, trace_dir=None):
  """Runs steps up to `config.train.steps` with logging, eval and checkpoints.

  `progress`, if given, is a tqdm-like bar advanced once per step. `save(step, state)` starts a
  checkpoint every `train.checkpoint_every` steps and at the end; when `stop_requested(step)`
  turns true (preemption), the loop saves and ends early. Steps with a non-finite loss or
  gradient leave the state unchanged and are counted; `train.max_nonfinite_steps` of them in
  a row raise NonFiniteError. With `train.profile_steps` = n and a `trace_dir`, this run's
  steps 2 … n+1 (the first compiles) are traced with the JAX profiler into `trace_dir`, where
  TensorBoard's profile plugin finds them. Returns (state, summary).
  """
  t = setup.config.train
  train_step, eval_step = make_train_step(setup), make_eval_step(setup)
  summary = {'first_loss': None, 'loss': None, 'eval_loss': None, 'first_eval_loss': None,
             'skipped_steps': 0, 'stopped_at': None}
  tokens_per_step = t.batch_size * t.seq_len
  chip = hardware.chip_for_device(jax.devices()[0].device_kind)
  # Model FLOPs per second of all devices over their datasheet peak, where the peak is known.
  mfu_per_token = (summary_lib.flops_per_token(setup.config.model, t.seq_len)
                   / (jax.device_count() * chip.peak_flops) if chip else None)
  start_step = int(state['step'])
  window_start, window_steps = time.perf_counter(), 0
  streak, pending_skip = 0, None
  trace = _Trace(range(start_step + 2, start_step + 2 + t.profile_steps) if trace_dir
                 else range(0), trace_dir)
  try:
    for step in range(start_step + 1, t.steps + 1):
      trace.before(step)
      state, metrics = train_step(state, global_batch(setup, next(train_iter)))
      trace.after(step, state)
      window_steps += 1
      # Reading the previous step's flag lets this step run meanwhile.
      if pending_skip is not None:
        streak = _count_skip(pending_skip, streak, summary, step - 1, t.max_nonfinite_steps)
      pending_skip = metrics['skipped']
      if summary['first_loss'] is None:
        summary['first_loss'] = float(metrics['loss'])
        window_start, window_steps = time.perf_counter(), 0  # leave compilation out of tokens/s
      if step % t.log_every == 0 or step == t.steps:
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - window_start
        if window_steps:
          metrics['tokens_per_sec'] = tokens_per_step * window_steps / elapsed
          if mfu_per_token:
            metrics['mfu'] = metrics['tokens_per_sec'] * mfu_per_token
        record = writer.write(step, metrics)
        summary['loss'], summary['tokens_per_sec'] = record['loss'], record.get('tokens_per_sec')
        if progress is not None:
          progress.set_postfix(loss=f'{record["loss"]:.3f}',
                               tok_s=f'{record.get("tokens_per_sec", 0):,.0f}', refresh=False)
        window_start, window_steps = time.perf_counter(), 0
      if eval_batches and t.eval_every and (step % t.eval_every == 0 or step == t.steps):
        eval_loss = evaluate(setup, eval_step, state, eval_batches)
        writer.write(step, {'loss': eval_loss}, split='eval')
        summary['eval_loss'] = eval_loss
        if summary['first_eval_loss'] is None:
          summary['first_eval_loss'] = eval_loss
        if progress is not None:
          progress.write(f'step {step}: eval loss {eval_loss:.3f}')
        window_start, window_steps = time.perf_counter(), 0
      if progress is not None:
        progress.update(1)
      stop = stop_requested is not None and stop_requested(step)
      if save is not None and (stop or step == t.steps
                               or (t.checkpoint_every and step % t.checkpoint_every == 0)):
        save(step, state)
      if stop:
        summary['stopped_at'] = step
        break
    if pending_skip is not None:
      _count_skip(pending_skip, streak, summary, int(state['step']), t.max_nonfinite_steps)
  finally:
    trace.close()
  return state, summary


def _count_skip(skipped, streak: int, summary: dict, step: int, limit: int) -> int:
  """The consecutive-skip count after `step`; NonFiniteError once it reaches `limit`."""
  if not int(skipped):
    return 0
  summary['skipped_steps'] += 1
  if streak + 1 >= limit:
    raise NonFiniteError(f'{streak + 1} consecutive steps up to step {step} had a non-finite '
                         f'loss or gradient (train.max_nonfinite_steps={limit}); the updates '
                         'were skipped and the last checkpoint holds the last good state')
  return streak + 1
