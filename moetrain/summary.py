"""What a run is about to do, printed before anything compiles: devices and mesh, parameters
(total and active per token), training FLOPs per token, tokens per step, and an estimate of
each device's memory, with a warning when it will not fit.
"""

import math

import jax
import numpy as np
from flax import nnx

from moetrain import stage_cost
from moetrain.models import layout
from moetrain.parallel import sharding
from moetrain.parallel.mesh import stages
from moetrain.state import build_model

EXPERT_WEIGHTS = ('ffn/w_gate', 'ffn/w_up', 'ffn/w_down')
# The weights of the matmuls `model.fp8` runs in FP8 (`models.fp8`): projections, dense MLPs,
# shared and routed experts; the router, embedding, output layer and gates stay as they are.
_FP8_WEIGHTS = ('wq', 'wk', 'wv', 'wo', 'wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'w_gate', 'w_up',
                'w_down')
# Bytes of activations kept per token, layer and unit of d_model for the backward pass, by
# `train.remat` (Korthikanti et al. 2022 count 34 bytes at 16 bits without recomputation; a
# fully rematerialised block keeps only its input).
_ACTIVATION_FACTOR = {'none': 17, 'save_dots': 8, 'full': 1}


def parameter_counts(model_config) -> dict:
  """{'total', 'active', 'embedding', 'fp8'}: every parameter, those one token uses (k of the E
  routed experts, all the rest), the token embedding's, and the active ones that FP8 matmuls
  multiply by under `model.fp8` (whatever it is set to)."""
  unscanned = model_config.copy_and_resolve_references()
  unscanned.scan_layers = False
  state = jax.eval_shape(lambda: nnx.state(build_model(unscanned, 0), nnx.Param))
  moe = model_config.moe
  counts = {'total': 0, 'active': 0, 'embedding': 0, 'fp8': 0}
  for name, leaf in layout.flatten(nnx.to_pure_dict(state)).items():
    size = math.prod(leaf.shape)
    counts['total'] += size
    routed = name.endswith(EXPERT_WEIGHTS) and leaf.ndim == 3
    # With null experts a token uses at most k real experts; k is the bound reported.
    active = size * min(moe.top_k, moe.num_experts) // moe.num_experts if routed else size
    counts['active'] += active
    if name.rsplit('/', 1)[-1] in _FP8_WEIGHTS:
      counts['fp8'] += active
    if name == 'embed':
      counts['embedding'] = size
  return counts


def matmul_weights(model_config, counts: dict) -> int:
  """Weights one token multiplies by: the active ones but the embedding lookup, plus the
  output layer when it is the tied embedding, and the shared output layer again for each
  multi-token-prediction depth. `counts`: `parameter_counts(model_config)`."""
  head = model_config.vocab_size * model_config.d_model
  matmul = counts['active'] - counts['embedding'] + model_config.mtp_layers * head
  return matmul + (counts['embedding'] if model_config.tie_embeddings else 0)


def flops_per_token(model_config, seq_len: int, counts: dict | None = None) -> float:
  """Training FLOPs per token: 6 per active matmul weight (forward and backward) plus the
  attention scores and weighted sums over `seq_len` keys (computed whole, causal or not).
  `counts`: `parameter_counts(model_config)` when already at hand."""
  m = model_config
  counts = counts or parameter_counts(m)
  matmul = matmul_weights(m, counts)
  return 6.0 * matmul + 6.0 * (m.num_layers + m.mtp_layers) * seq_len * attention_width(m)


def attention_width(model_config) -> int:
  """Channels a query meets per key in one block's attention, scores and weighted sums
  together: 2 FLOPs per key and channel forward."""
  m = model_config
  if m.attention == 'mla':
    return m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
  return 2 * query_heads(m) * (m.head_dim or m.d_model // m.num_heads)


def query_heads(model_config) -> int:
  """Query heads of one block's attention: every attention expert computes all of its own."""
  return max(model_config.attention_experts, 1) * model_config.num_heads


def _bytes_per_device(tree, shardings) -> float:
  """Bytes one device holds of arrays `tree` placed with `shardings` (exact for even splits)."""
  total = 0.0
  for leaf, placement in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = placement.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def layer_token_bytes(config, heads_shards: int = 1) -> float:
  """Activation bytes one layer keeps per token for the backward pass, by `train.remat` (with
  the float32 attention scores of the heads on this device when nothing is rematerialised)."""
  m, t = config.model, config.train
  remat = t.remat
  width = np.dtype(m.dtype).itemsize
  scores = query_heads(m) / heads_shards * t.seq_len * 4 if remat == 'none' else 0
  return _ACTIVATION_FACTOR[remat] * m.d_model * width + scores


def activation_bytes(config, mesh_shape: dict, heads_shards: int = 1) -> float:
  """Estimated activation bytes per device on a mesh of these (resolved) axis sizes: each
  layer's `layer_token_bytes` for the tokens of one microbatch, plus float32 logits and their
  gradient; with pipeline stages, `stage_cost.pipeline_activations` (every iteration's
  residuals of the stage's units, the blocks outside the stack, the microbatch buffers)."""
  m, t = config.model, config.train
  per_layer, per_logit = layer_token_bytes(config, heads_shards), m.vocab_size * 4 * 2
  if mesh_shape.get('stage', 1) > 1:
    return sum(stage_cost.pipeline_activations(config, mesh_shape, per_layer,
                                               per_logit).values())
  tokens = t.batch_size * t.seq_len / stage_cost.batch_shards(mesh_shape) / t.microbatches
  return tokens * (m.num_layers * per_layer + per_logit)


def memory_per_device(setup, abstract_state) -> dict:
  """Estimated bytes per device: 'params', 'optimizer' (exact, from the shardings: with
  stages, one stage's share of the stack), 'activations' (a rule of thumb, `activation_bytes`)
  and their 'total'."""
  shardings = setup.state_shardings
  params = _bytes_per_device(abstract_state['params'], shardings['params'])
  optimizer = _bytes_per_device(abstract_state['opt_state'], shardings['opt_state'])
  activations = activation_bytes(setup.config, dict(setup.mesh.shape),
                                 sharding.shards(setup.mesh, 'heads'))
  return {'params': params, 'optimizer': optimizer, 'activations': activations,
          'total': params + optimizer + activations}


def _gib(value: float) -> str:
  return f'{value / 2**30:.2f} GiB'


def describe(setup, abstract_state) -> list[str]:
  """The summary's lines, and a warning line when the estimate exceeds a device's memory."""
  config = setup.config
  m, t = config.model, config.train
  devices = jax.devices()
  counts = parameter_counts(m)
  memory = memory_per_device(setup, abstract_state)
  mesh = ', '.join(f'{name}={size}' for name, size in setup.mesh.shape.items())
  lines = [
      f'devices: {len(devices)} × {devices[0].device_kind} ({jax.process_count()} process(es));'
      f' mesh {mesh}',
      f'parameters: {counts["total"]:,} total, {counts["active"]:,} active per token '
      f'({counts["embedding"]:,} in the token embedding)',
      f'compute: {flops_per_token(m, t.seq_len, counts):.3g} training FLOPs per token, '
      f'{t.batch_size * t.seq_len:,} tokens per step'
      + (f' ({6.0 * counts["fp8"]:.3g} in FP8 matmuls, model.fp8={m.fp8})'
         if m.fp8 != 'none' else ''),
      f'memory per device (estimate): {_gib(memory["total"])} = params '
      f'{_gib(memory["params"])} + optimizer {_gib(memory["optimizer"])} + activations '
      f'{_gib(memory["activations"])}']
  if stages(setup.mesh) > 1:
    lines.append(stage_cost.describe(config, dict(setup.mesh.shape))
                 + '; the memory above is one stage\'s')
  try:
    limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  except (AttributeError, NotImplementedError, RuntimeError):  # no figure on this platform
    limit = None
  if limit and memory['total'] > limit:
    lines.append(f'warning: the estimate exceeds the {_gib(limit)} of one device; shard more '
                 '(mesh.fsdp, mesh.expert), rematerialise (train.remat) or use microbatches')
  return lines
