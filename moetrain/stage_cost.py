"""What pipeline stages cost, by formula: the bubble, the bytes that move between stages and the
activations a stage keeps (`config.mesh.stage` = S > 1, `parallel.stages`).

The schedule these formulas describe: the main layer stack (the MoE units; a dense model's
blocks) of U units is split into S·R chunks of K = U / (S·R) units (R =
`model.pipeline_repeats`; 1 is GPipe, more a circular schedule), stage s holding chunks r·S + s.
The batch's M = `train.microbatches` microbatches go through it in T = M·R + S − 1 iterations;
in each, every stage runs one microbatch of B/M sequences through one of its chunks (idle stages
compute on placeholders and are masked, so every stage computes in all T), then sends its
output on around a ring (the last stage's to stage 0, which holds it for the next round). The
loop is differentiated as a whole: all forwards, then all backwards (GPipe's order). The embedding, the leading dense blocks, the trailing blocks, the
final norm, the head and the loss run before and after it with the batch split over the stages
too, so nothing there is computed twice.

Sizes are per device. A mesh is a dict of axis sizes with every axis of `parallel.mesh.AXES`
resolved (no -1); a missing axis counts as 1.
"""

import math

import jax.numpy as jnp
import numpy as np

from moetrain import hardware, hlo_stats
from moetrain.models.transformer import layer_plan
from moetrain.parallel.mesh import AXES, BATCH_AXES
from moetrain.parallel.stages import bubble_fraction, iterations


def stack_units(model_config) -> int:
  """U: the units of the stack the stages split (the MoE units, or a dense model's blocks)."""
  dense, units, _, _ = layer_plan(model_config)
  return units or dense


def chunk_units(config, stages: int) -> int:
  """K = U / (S·R): the units a stage runs per iteration."""
  return stack_units(config.model) // (stages * config.model.pipeline_repeats)


def batch_shards(mesh: dict) -> int:
  """Into how many pieces the data-holding axes (data × fsdp × expert) split a batch."""
  return math.prod(mesh.get(axis, 1) for axis in BATCH_AXES)


def microbatch_bytes(config, mesh: dict) -> float:
  """A: one microbatch's activations on one device, [B/M, L, D] in `model.dtype` over the
  batch shards: what a stage sends to the next per iteration and direction."""
  t, m = config.train, config.model
  sequences = t.batch_size / t.microbatches / batch_shards(mesh)
  return sequences * t.seq_len * m.d_model * np.dtype(jnp.dtype(m.dtype)).itemsize


def stage_bytes(config, mesh: dict) -> dict:
  """Bytes one device sends per step over the stage axis, by what they carry:
  - 'permute': its output around the ring, A per iteration, forward and backward: 2·T·A;
  - 'input': the microbatches' inputs, computed split over the stages and gathered by every
    stage (an all-gather of M·A, forward; a reduce-scatter backward): 2·(S − 1)/S·M·A;
  - 'output': the finished microbatches, held by stage 0, sent to the stages that run the
    head on them (and their gradients back): 2·(S − 1)/S·M·A.
  All zero without stages."""
  stages = mesh.get('stage', 1)
  if stages == 1:
    return {'permute': 0.0, 'input': 0.0, 'output': 0.0}
  m, t = config.model, config.train
  steps = iterations(stages, t.microbatches, m.pipeline_repeats)
  one = microbatch_bytes(config, mesh)
  spread = 2 * (stages - 1) / stages * t.microbatches * one
  return {'permute': 2 * steps * one, 'input': spread, 'output': spread}


def stage_groups(mesh: dict) -> list[list[int]]:
  """Device ids along the stage axis, one group per position of the other axes (stages are
  the outermost axis: stage s holds ids s·N/S … (s + 1)·N/S − 1)."""
  sizes = [mesh.get(axis, 1) for axis in AXES]
  ids = np.moveaxis(np.arange(math.prod(sizes)).reshape(sizes), AXES.index('stage'), -1)
  return ids.reshape(-1, mesh.get('stage', 1)).tolist()


def stage_link(mesh: dict, node_size: int) -> str:
  """'inter' when the stage groups span nodes of `node_size` devices (then some hop of every
  iteration crosses the network, and the others wait for it), else 'intra'."""
  collective = hlo_stats.Collective('collective-permute', '', 0, stage_groups(mesh))
  node_of = hardware.node_map(math.prod(mesh.get(axis, 1) for axis in AXES), node_size)
  return 'inter' if collective.nodes(node_of) > 1 else 'intra'


def pipeline_activations(config, mesh: dict, layer_token_bytes: float,
                         logit_token_bytes: float) -> dict:
  """Activation bytes a device keeps for the backward pass with stages, from the bytes one
  layer keeps per token (`layer_token_bytes`, by `train.remat`) and the logits' per token:
  - 'stack': every iteration's residuals of the K units it ran on one microbatch of b = B/M
    over the batch shards, all T kept until the backward pass: T·K·l·b·L·layer_token_bytes
    (l blocks per unit);
  - 'outside': the blocks before and after the stack and the head on the batch split over the
    stages: (dense + tail)·(B/(S·shards))·L·layer_token_bytes + the same tokens' logits;
  - 'buffers': the microbatches' inputs, held by every stage, and stage 0's ring buffer of
    them: 2·M·A (A = `microbatch_bytes`)."""
  m, t = config.model, config.train
  stages, shards = mesh.get('stage', 1), batch_shards(mesh)
  dense, units, length, tail = layer_plan(m)
  outside_layers = dense + tail if units else tail
  steps = iterations(stages, t.microbatches, m.pipeline_repeats)
  micro_tokens = t.batch_size / t.microbatches / shards * t.seq_len
  stage_tokens = t.batch_size / stages / shards * t.seq_len
  blocks = chunk_units(config, stages) * (length if units else 1)
  stack = steps * blocks * micro_tokens * layer_token_bytes
  outside = stage_tokens * (outside_layers * layer_token_bytes + logit_token_bytes)
  buffers = 2 * t.microbatches * microbatch_bytes(config, mesh)
  return {'stack': stack, 'outside': outside, 'buffers': buffers}


def describe(config, mesh: dict) -> str:
  """The startup summary's line for the pipeline: stages, schedule, bubble and the bytes each
  device sends over the stage axis per step."""
  m, t = config.model, config.train
  stages, repeats = mesh.get('stage', 1), m.pipeline_repeats
  sent = stage_bytes(config, mesh)
  mib = lambda value: f'{value / 2**20:.1f} MiB'
  schedule = 'GPipe' if repeats == 1 else 'circular'
  units = f'{chunk_units(config, stages)} of the {stack_units(m)} stack units'
  return (f'pipeline: {stages} stages × {repeats} repeat{"s" * (repeats > 1)} ({schedule}), '
          f'{t.microbatches} microbatches, {iterations(stages, t.microbatches, repeats)} '
          f'iterations of {units}: bubble '
          f'{bubble_fraction(stages, t.microbatches, repeats):.0%}; per step and device '
          f'{mib(sent["permute"])} sent to the next stage, {mib(sent["input"])} gathered in, '
          f'{mib(sent["output"])} sent out')
