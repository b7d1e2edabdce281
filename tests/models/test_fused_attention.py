"""The attention implementation each platform gets, and that every path equals plain softmax
attention: XLA through `attend` on CPU, the splash kernel in interpret mode."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.models import fused_attention
from moetrain.models.layers import attend

HOPPER, AMPERE, TURING = (9, 0), (8, 0), (7, 5)
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
MHA = dict(q_shape=(8, 2048, 16, 128), v_shape=(8, 2048, 16, 128))
GQA = dict(q_shape=(8, 2048, 16, 128), v_shape=(8, 2048, 4, 128))
MLA_PADDED = dict(q_shape=(8, 2048, 16, 192), v_shape=(8, 2048, 16, 192))


@pytest.mark.parametrize('platform, capability, dtype, shapes, segments, shards, expected', [
    ('gpu', HOPPER, BF16, MHA, False, (1, 1), 'cudnn'),
    ('gpu', AMPERE, F16, GQA, False, (1, 1), 'cudnn'),
    ('gpu', HOPPER, BF16, MHA, True, (1, 1), 'xla'),  # packed documents
    ('gpu', HOPPER, BF16, dict(q_shape=(8, 2048, 16, 192), v_shape=(8, 2048, 16, 128)), False,
     (1, 1), 'xla'),  # MLA's unequal head widths
    ('gpu', HOPPER, BF16, MLA_PADDED, False, (1, 1), 'cudnn'),
    ('gpu', AMPERE, BF16, MLA_PADDED, False, (1, 1), 'xla'),  # > 128 before Hopper
    ('gpu', HOPPER, BF16, dict(q_shape=(8, 2048, 16, 100), v_shape=(8, 2048, 16, 100)), False,
     (1, 1), 'xla'),  # not a multiple of 8
    ('gpu', HOPPER, F32, MHA, False, (1, 1), 'xla'),
    ('gpu', TURING, F16, MHA, False, (1, 1), 'xla'),
    ('gpu', None, BF16, MHA, False, (1, 1), 'xla'),  # not CUDA (ROCm)
    ('tpu', None, BF16, MHA, False, (1, 1), 'splash'),
    ('tpu', None, F32, GQA, True, (8, 4), 'splash'),
    ('tpu', None, BF16, MLA_PADDED, True, (1, 1), 'splash'),
    ('tpu', None, BF16, dict(q_shape=(8, 100, 16, 128), v_shape=(8, 100, 16, 128)), False,
     (1, 1), 'xla'),  # not whole 128-position blocks
    ('tpu', None, F16, MHA, False, (1, 1), 'xla'),
    ('tpu', None, BF16, GQA, False, (1, 8), 'xla'),  # 4 KV heads over 8 devices
    ('tpu', None, BF16, GQA, False, (16, 1), 'xla'),  # a batch of 8 over 16 devices
    ('cpu', None, BF16, MHA, False, (1, 1), 'xla'),
    ('cpu', None, F32, GQA, True, (1, 1), 'xla'),
])
def test_implementation(platform, capability, dtype, shapes, segments, shards, expected):
  assert fused_attention.implementation(platform, dtype, segments=segments,
                                        cuda_capability=capability, shards=shards,
                                        **shapes) == expected


def reference(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, scale):
  """softmax(q kᵀ · scale) v under the causal and same-segment masks, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits_BxNxLxS = np.einsum('blnh,bsnh->bnls', q, k) * scale
  length = q.shape[1]
  mask_BxLxS = np.tril(np.ones((length, length), bool))[None]
  if segments_BxL is not None:
    segments = np.asarray(segments_BxL)
    mask_BxLxS = mask_BxLxS & (segments[:, :, None] == segments[:, None, :])
  logits_BxNxLxS = np.where(mask_BxLxS[:, None], logits_BxNxLxS, -np.inf)
  weights = np.exp(logits_BxNxLxS - logits_BxNxLxS.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bnls,bsnh->blnh', weights, v)


def inputs(batch, length, heads, kv_heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
  # Row 0 holds three documents, row 1 two, as `data.packing` numbers them.
  segments = np.ones((batch, length), np.int32)
  segments[0, 3:], segments[0, 7:] = 2, 3
  segments[1:, 5:] = 2
  return q, k, v, jnp.asarray(segments)


@pytest.mark.parametrize('kv_heads', [4, 2])
@pytest.mark.parametrize('with_segments', [False, True])
@pytest.mark.parametrize('scale', [None, 0.3])
def test_attend_on_cpu_equals_softmax_attention(kv_heads, with_segments, scale):
  q, k, v, segments = inputs(batch=2, length=10, heads=4, kv_heads=kv_heads, head_dim=8)
  segments = segments if with_segments else None
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  module = types.SimpleNamespace(mesh=None)  # an attention layer without a cache, on no mesh
  out = attend(module, q, k, v, positions, segments, scale=scale)
  expected = reference(q, k, v, segments, 8 ** -0.5 if scale is None else scale)
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize('with_segments, mesh_shape', [(True, (2, 1, 1, 2)), (False, None)])
def test_splash_kernel_equals_xla(with_segments, mesh_shape):
  """Values and gradients of the splash kernel (interpret mode) against XLA's attention,
  with GQA, on its own and per device under a (data, fsdp, expert, tensor) mesh."""
  q, k, v, segments = inputs(batch=2, length=128, heads=4, kv_heads=2, head_dim=16)
  segments = segments if with_segments else None
  weights_H = jnp.cos(jnp.arange(16.0))

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v) * weights_H)
  mesh = None if mesh_shape is None else jax.make_mesh(
      mesh_shape, ('data', 'fsdp', 'expert', 'tensor'),
      axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=jax.devices()[:4])
  splash = lambda q, k, v: fused_attention.splash_attention(q, k, v, segments, scale=0.2,
                                                            mesh=mesh, interpret=True)
  xla = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=fused_attention.same_segment(segments), is_causal=True, scale=0.2,
      implementation='xla')
  expected = xla(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)
  got = jax.jit(splash)(q, k, v), jax.jit(jax.grad(loss(splash), (0, 1, 2)))(q, k, v)
  for got_x, expected_x in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got_x, expected_x, atol=2e-5)
