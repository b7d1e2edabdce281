"""The jitted train and eval steps: the loss, its gradients (over microbatches too) and the
optimizer update, with explicit in/out shardings."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moetrain.data.packing import document_segments
from moetrain.data.tokenizer import EOS_ID, PAD_ID
from moetrain.models import layout, routing, routing_stats
from moetrain.models.mtp import shift_left
from moetrain.parallel import sharding
from moetrain.parallel.mesh import stages
from moetrain.state import Setup


def objective(ce, aux_loss, z_loss, entropy, mtp_loss, model_config):
  """The training objective: cross-entropy plus the weighted router losses (balance, z, and
  the router entropy: the dynamic loss of top-p routing) and the weighted
  multi-token-prediction loss (the mean of its depths' cross-entropies). The one place they
  are combined, for a whole batch and for a microbatch's share of one."""
  moe = model_config.moe
  return (ce + moe.aux_loss_weight * aux_loss + moe.z_loss_weight * z_loss
          + moe.dynamic_loss_weight * entropy + model_config.mtp_loss_weight * mtp_loss)


def mtp_targets(targets_BxL, depths: int):
  """The targets of each multi-token-prediction depth k = 1 … D: position i's is the target
  of position i + k, PAD past the row's end: [B, L] → [D, B, L]."""
  shifted = [shift_left(targets_BxL, k, PAD_ID) for k in range(1, depths + 1)]
  return jnp.stack(shifted) if shifted else jnp.zeros((0, *targets_BxL.shape), jnp.int32)


def mtp_target_counts(targets_BxL, depths: int):
  """The non-padding targets of each multi-token-prediction depth: [B, L] → float32 [D]."""
  return (mtp_targets(targets_BxL, depths) != PAD_ID).sum((1, 2)).astype(jnp.float32)


def _ce_sum(logits_BxLxV, targets_BxL):
  """Cross-entropy summed over the non-padding targets, and their count."""
  weights_BxL = (targets_BxL != PAD_ID).astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  return (ce_BxL * weights_BxL).sum(), weights_BxL.sum()


def forward(model, batch, capacity_factor, *, train=False, rng=None, document_mask=True,
            mtp_depths=0):
  """-> (cross-entropy summed over non-padding targets, their count, the MoE layers'
  `RoutingStats` stacked, the cross-entropy of each of the first `mtp_depths` multi-token-
  prediction depths summed over its non-padding targets [mtp_depths]). The batch's fields are
  [B, L], or [M, B, L] for M microbatches through pipeline stages (`Transformer.forward`).

  With `document_mask` the documents packed into a row attend only within themselves, each
  from position 0 (segments and positions from their end-of-document tokens, `data.packing`);
  without it every token attends to the whole row before it.
  """
  inputs_BxL, targets_BxL = batch['inputs'], batch['targets']
  segments_BxL, positions_BxL = (document_segments(inputs_BxL, EOS_ID) if document_mask
                                 else (None, None))
  args = (inputs_BxL, inputs_BxL != PAD_ID, capacity_factor)
  kwargs = dict(train=train, rng=rng, segments_BxL=segments_BxL, positions_BxL=positions_BxL)
  if not mtp_depths:
    logits_BxLxV, stats = model.forward(*args, **kwargs)
    return (*_ce_sum(logits_BxLxV, targets_BxL), stats, jnp.zeros((0,), jnp.float32))
  logits_BxLxV, logits_DxBxLxV, stats = model.forward_mtp(*args, **kwargs)
  mtp_ce_D = jnp.stack([_ce_sum(depth_logits_BxLxV, depth_targets_BxL)[0]
                        for depth_logits_BxLxV, depth_targets_BxL
                        in zip(logits_DxBxLxV, mtp_targets(targets_BxL, mtp_depths))])
  return (*_ce_sum(logits_BxLxV, targets_BxL), stats, mtp_ce_D)


def step_metrics(ce_sum, targets, stats, model_config, mtp_ce_D=None,
                 mtp_targets_D=None) -> dict:
  """The metrics of a batch from its totals: `loss` (the cross-entropy alone), `total_loss`,
  the router losses summed over layers, the per-layer metrics and the target `tokens`; with
  multi-token prediction (its depths' cross-entropy sums and target counts) also `mtp_loss`,
  the mean over depths, and `mtp_loss_per_depth`."""
  ce = ce_sum / jnp.maximum(targets, 1.0)
  per_layer = routing_stats.layer_metrics(stats)
  aux, z = per_layer['aux_loss_per_layer'].sum(), per_layer['z_loss_per_layer'].sum()
  mtp = {}
  if mtp_ce_D is not None and mtp_ce_D.size:
    per_depth = mtp_ce_D / jnp.maximum(mtp_targets_D, 1.0)
    mtp = {'mtp_loss': per_depth.mean(), 'mtp_loss_per_depth': per_depth}
  total = objective(ce, aux, z, per_layer['router_entropy'].sum(), mtp.get('mtp_loss', 0.0),
                    model_config)
  return {'loss': ce, 'total_loss': total, 'aux_loss': aux, 'z_loss': z, **mtp, **per_layer,
          'tokens': targets}


def loss_and_metrics(model, batch, model_config, capacity_factor, *, train=False, rng=None,
                     document_mask=True):
  """(objective, metrics) of one batch; see `forward` and `step_metrics`. In training the
  multi-token-prediction depths count too."""
  depths = model_config.mtp_layers if train else 0
  ce_sum, targets, stats, mtp_ce_D = forward(model, batch, capacity_factor, train=train, rng=rng,
                                             document_mask=document_mask, mtp_depths=depths)
  metrics = step_metrics(ce_sum, targets, stats, model_config, mtp_ce_D,
                         mtp_target_counts(batch['targets'], depths))
  return metrics['total_loss'], metrics


def gradients(setup: Setup, params, buffers, batch, rng):
  """Gradients of the training objective, the step's metrics and the updated buffers.

  The batch runs as `train.microbatches` = k microbatches: in a `lax.scan` (k = 1 is one
  pass), or with pipeline stages all k through the pipeline in one pass. Each microbatch
  contributes its share of the step's objective: cross-entropy and z-loss over all the step's
  tokens, so they and their gradients equal one pass over the whole batch, and the aux loss as
  the mean of the per-microbatch values (MOE_SPEC.md). The routing statistics add up by their
  declared reductions, so the metrics do not depend on k, and the balancing biases move once,
  by the step's load.
  """
  model_config = setup.config.model
  moe, depths = model_config.moe, model_config.mtp_layers
  k = setup.config.train.microbatches
  targets = jnp.maximum((batch['targets'] != PAD_ID).sum().astype(jnp.float32), 1.0)
  routed = jnp.maximum((batch['inputs'] != PAD_ID).sum().astype(jnp.float32), 1.0)
  mtp_targets_D = mtp_target_counts(batch['targets'], depths)
  micro = split_microbatches(batch, k, moe.group_size, setup.mesh)

  def share(params, microbatch, microbatch_rng, aux_share):
    model = nnx.merge(setup.graphdef, params, buffers)
    ce_sum, microbatch_targets, stats, mtp_ce_D = forward(
        model, microbatch, moe.capacity_factor, train=True, rng=microbatch_rng,
        document_mask=setup.config.train.document_mask, mtp_depths=depths)
    mtp_loss = (mtp_ce_D / jnp.maximum(mtp_targets_D, 1.0)).mean() if depths else 0.0
    loss = objective(ce_sum / targets, stats.aux_loss.sum() * aux_share,
                     stats.z_sum.sum() / routed, stats.entropy_sum.sum() / routed, mtp_loss,
                     model_config)
    return loss, (ce_sum, microbatch_targets, stats, mtp_ce_D)

  if stages(setup.mesh) > 1:
    # All k microbatches in one pass: their stats already hold the mean aux loss.
    grads, (ce_sum, target_count, stats, mtp_ce_D) = jax.grad(share, has_aux=True)(
        params, micro, rng, 1.0)
  else:
    def body(grads, xs):
      microbatch, index = xs
      microbatch_grads, totals = jax.grad(share, has_aux=True)(
          params, microbatch, jax.random.fold_in(rng, index), 1.0 / k)
      return jax.tree.map(jnp.add, grads, microbatch_grads), totals
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (ce_sums, target_counts, stats_K, mtp_ce_KxD) = jax.lax.scan(
        body, zeros, (micro, jnp.arange(k)))
    ce_sum, target_count, mtp_ce_D = ce_sums.sum(), target_counts.sum(), mtp_ce_KxD.sum(0)
    stats = routing_stats.reduce_microbatches(stats_K)
  metrics = step_metrics(ce_sum, target_count, stats, model_config, mtp_ce_D, mtp_targets_D)
  return grads, metrics, balance_biases(buffers, stats, model_config)


def balance_biases(buffers, stats, model_config):
  """The buffers with every MoE layer's balancing bias moved by the step's load (stats of the
  MoE layers in layer order), as auxiliary-loss-free balancing prescribes (MOE_SPEC.md)."""
  rate = model_config.moe.bias_update_rate
  if not rate:
    return buffers
  flat = layout.to_layers(buffers, model_config)
  names = sorted((name for name in flat if name.endswith('/router_bias')),
                 key=lambda name: int(name.split('/')[1]))
  for layer, name in enumerate(names):
    flat[name] = routing.update_bias(flat[name], stats.assignments_E[layer], rate)
  return layout.from_layers(flat, model_config)


def split_microbatches(batch, k: int, group_size: int, mesh=None):
  """[B, L] → [k, B/k, L] per field, microbatch i holding dispatch groups i, i+k, i+2k, ...

  The batch is sharded over its rows, so every device's contiguous share of groups splits
  evenly over the k microbatches and each microbatch stays sharded the same way: the reshape
  moves no data between devices.
  """
  def split(x_BxL):
    b, l = x_BxL.shape
    x = x_BxL.reshape(b // (k * group_size), k, group_size, l).transpose(1, 0, 2, 3)
    return sharding.constrain(x.reshape(k, b // k, l), mesh, None, 'batch', None)
  return {name: split(x) for name, x in batch.items()}


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


def make_eval_step(setup: Setup, with_stats: bool = False):
  """jit(params, buffers, batch) → (sum of cross-entropy, number of target tokens), and with
  `with_stats` the MoE layers' `RoutingStats` too."""
  model_config = setup.config.model

  def eval_step(params, buffers, batch):
    model = nnx.merge(setup.graphdef, params, buffers)
    if stages(setup.mesh) > 1:
      batch = split_microbatches(batch, setup.config.train.microbatches,
                                 model_config.moe.group_size, setup.mesh)
    ce_sum, targets, stats, _ = forward(model, batch, model_config.moe.eval_capacity_factor,
                                        document_mask=setup.config.train.document_mask)
    return (ce_sum, targets, stats) if with_stats else (ce_sum, targets)

  batch_shardings = {'inputs': setup.batch_sharding, 'targets': setup.batch_sharding}
  return jax.jit(eval_step, in_shardings=(setup.state_shardings['params'],
                                          setup.state_shardings['buffers'], batch_shardings),
                 out_shardings=sharding.replicated(setup.mesh))
