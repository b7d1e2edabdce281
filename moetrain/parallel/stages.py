"""Pipeline parallelism: a layer stack split over the mesh's `stage` axis, microbatches flowing
through it.

The schedule is circular (interleaved) with R ≥ 1 rounds; R = 1 is GPipe. The stack's K·S·R
units form S·R chunks of K; chunk c = r·S + s belongs to stage s, so a microbatch visits
stages 0, 1, …, S−1 in round 0, then again in round 1, and so on. The weights are stored
[R, S·K, …] with the second axis split over the stages: stage s holds exactly its chunks, in
the stack's own order, so a checkpoint does not depend on the stage count.

Each of the T = M·R + S − 1 iterations runs every stage on one microbatch at once
(`jax.vmap` over the stage axis with `spmd_axis_name='stage'`: GSPMD keeps each stage's
weights and activations on its devices, and everything inside, the expert exchange included,
runs as without stages) and then shifts the activations one stage on (a collective-permute).
The shift is a ring: stage S−1's output goes to stage 0, which holds it with the microbatches
it has yet to feed in until the microbatch's next round; M ≥ S makes each output arrive before
stage 0 needs it.

Why this schedule: it is the one that autodiff of a loop gives. The loop is differentiated as a
whole, so the backward pass runs the iterations in reverse: GPipe's order (all forwards, then
all backwards), not 1F1B. What lives between them is each iteration's residuals: with
`train.remat` only the blocks' inputs ([b, L, D] per block, iteration and stage). 1F1B would
bound that to S microbatches, but needs a hand-written backward schedule; the bubble,
(S − 1) / (M·R + S − 1) of every stage's time, is the same. (Rematerialising a stage's whole
iteration instead keeps one input per iteration but, in a deep stage, every block's full
activations during the recompute: more, not less, for DeepSeek-V3's 29-unit stages.)
"""

import jax
import jax.numpy as jnp

from moetrain.parallel import sharding


def iterations(stages: int, microbatches: int, repeats: int = 1) -> int:
  """T = M·R + S − 1: the schedule's iterations, every stage busy or idle in each."""
  return microbatches * repeats + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """(S − 1) / T: the share of each stage's iterations spent idle (filling and draining the
  pipeline)."""
  return (stages - 1) / iterations(stages, microbatches, repeats)


def run(stage_fn, weights, x_MxBxLxD, side, *, mesh, repeats: int):
  """Runs M microbatches through the stack `weights` over the mesh's S stages.

  `weights`: leaves [R, S·K, …] (R = `repeats` > 1) or [S·K, …]. `side`: leaves [M, …], the
  per-microbatch inputs other than the activations (positions, masks, keys).
  `stage_fn(chunk_weights, x_BxLxD, side_of_microbatch, chunk)` runs chunk `chunk` (leaves
  [K, …]) and returns (x_BxLxD, stats with leaves [K, …]).

  Returns (the outputs [M, B, L, D], the stats of every unit [S·K·R, …] in stack order, summed
  over the microbatches).
  """
  stages = mesh.shape['stage']
  microbatches = x_MxBxLxD.shape[0]
  passes = microbatches * repeats

  def by_stage(w):  # [R, S·K, …] → [S, R, K, …]
    w = w if repeats > 1 else w[None]
    w = w.reshape(repeats, stages, w.shape[1] // stages, *w.shape[2:])
    return jnp.swapaxes(w, 0, 1)
  weights_S = jax.tree.map(by_stage, weights)
  stage_S = jnp.arange(stages)

  def pin(x_SxBxLxD):
    return sharding.constrain(x_SxBxLxD, mesh, 'stages', 'batch', None, None)

  def run_stages(state_SxBxLxD, t):
    pass_S = t - stage_S
    valid_S = (pass_S >= 0) & (pass_S < passes)
    pass_S = jnp.clip(pass_S, 0, passes - 1)
    micro_S, round_S = pass_S % microbatches, pass_S // microbatches
    chunk_weights = jax.vmap(lambda w, r: jax.tree.map(lambda a: a[r], w))(weights_S, round_S)
    side_S = jax.tree.map(lambda a: a[micro_S], side)
    out_SxBxLxD, stats_S = jax.vmap(stage_fn, spmd_axis_name='stage')(
        chunk_weights, state_SxBxLxD, side_S, round_S * stages + stage_S)
    # Idle stages computed on placeholders: their stats count for nothing.
    mask = lambda a: a * valid_S.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    rounds_SxR = jax.nn.one_hot(round_S, repeats, dtype=jnp.float32)
    stats_R = jax.tree.map(lambda a: jnp.einsum('sr,s...->rs...', rounds_SxR, mask(a)), stats_S)
    return pin(out_SxBxLxD), stats_R, valid_S[-1], micro_S[-1]

  first_S = (stage_S == 0).reshape((stages,) + (1,) * (x_MxBxLxD.ndim - 1))

  def iteration(carry, t):
    state_SxBxLxD, held_SxMxBxLxD, totals = carry
    out_SxBxLxD, stats_R, last_valid, last_micro = run_stages(state_SxBxLxD, t)
    # One collective-permute around the ring: stage s + 1 receives stage s's output, stage 0
    # the last stage's, which it holds for the microbatch's next round (or as the result).
    passed_SxBxLxD = pin(jnp.roll(out_SxBxLxD, 1, axis=0))
    held_SxBxLxD = jnp.where(last_valid, passed_SxBxLxD, held_SxMxBxLxD[:, last_micro])
    held_SxMxBxLxD = held_SxMxBxLxD.at[:, last_micro].set(held_SxBxLxD)
    next_SxBxLxD = jnp.where(first_S, held_SxMxBxLxD[:, (t + 1) % microbatches],
                             passed_SxBxLxD)
    totals = jax.tree.map(jnp.add, totals, stats_R)
    return (pin(next_SxBxLxD), held_SxMxBxLxD, totals), None

  # Only stage 0's row of `held` is read: every stage holds a row so that it stays local.
  held_SxMxBxLxD = sharding.constrain(
      jnp.broadcast_to(x_MxBxLxD, (stages,) + x_MxBxLxD.shape), mesh,
      'stages', None, 'batch', None, None)
  state_SxBxLxD = held_SxMxBxLxD[:, 0]
  totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(lambda: run_stages(state_SxBxLxD, 0)[1]))
  (_, held_SxMxBxLxD, totals), _ = jax.lax.scan(
      iteration, (state_SxBxLxD, held_SxMxBxLxD, totals),
      jnp.arange(iterations(stages, microbatches, repeats)))
  stats = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:]), totals)
  return held_SxMxBxLxD[0], stats


def over_stages(fn, mesh, *arrays_MxB):
  """`fn(*arrays)` on each microbatch (the arrays' leading axis), the microbatches split over
  the stages: each stage computes its share, none repeats another's, and every microbatch
  keeps its rows split over the batch axes as before. Outputs [M, B, …]."""
  stages = mesh.shape['stage']
  split = lambda a: a.reshape((stages, a.shape[0] // stages) + a.shape[1:])
  merge = lambda a: a.reshape((-1,) + a.shape[2:])
  outputs = jax.vmap(jax.vmap(fn), spmd_axis_name='stage')(*jax.tree.map(split, arrays_MxB))
  return jax.tree.map(merge, outputs)
