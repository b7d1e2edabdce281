"""Causal self-attention by a fused kernel where the platform has one that takes the call:
cuDNN flash attention on NVIDIA GPUs, the Pallas splash kernel on TPUs, XLA otherwise.

`implementation` decides from the platform, dtype, shapes and mask alone, so every
platform's rules are testable on a CPU host.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.extend import backend as jax_backend

from moetrain.parallel import sharding

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SPLASH_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
# Splash tiles the sequence in blocks of a multiple of the TPU's 128 lanes (its segment-id
# masks require it); 512 is the largest block used, shorter sequences take a divisor.
SPLASH_LANES, SPLASH_BLOCK = 128, 512


def implementation(platform: str, dtype, q_shape, v_shape, *, segments: bool,
                   cuda_capability: tuple[int, int] | None = None, shards=(1, 1)) -> str:
  """'cudnn', 'splash' or 'xla' for causal self-attention of q [B, L, N, H] over values
  [B, L, K, Hv] (keys: [B, L, K, H]).

  `platform`: 'cpu', 'gpu', 'tpu', …; `cuda_capability`: (major, minor) of an NVIDIA GPU, None
  for any other GPU; `segments`: packed documents must not see each other; `shards`: how many
  ways the context mesh splits the batch and the heads.
  """
  batch, length, heads, head_dim = q_shape
  kv_heads, v_head_dim = v_shape[-2:]
  dtype = jnp.dtype(dtype)
  if platform == 'gpu' and cuda_capability is not None:
    # cuDNN's flash attention needs sm80+ and takes head dims ≤ 128 (≤ 256 from Hopper on) in
    # multiples of 8. Through jax.nn it would see segments only as a dense [B, 1, L, L] bias
    # (jax.nn exposes no segment offsets), so packed documents stay with XLA; jax.nn takes
    # value heads only as wide as the query's (MLA pads its values to that width).
    max_head_dim = 256 if cuda_capability >= (9, 0) else 128
    fits = (cuda_capability >= (8, 0) and dtype in CUDNN_DTYPES and not segments
            and head_dim == v_head_dim and head_dim % 8 == 0 and head_dim <= max_head_dim)
    return 'cudnn' if fits else 'xla'
  if platform == 'tpu':
    batch_shards, head_shards = shards
    fits = (dtype in SPLASH_DTYPES and length % SPLASH_LANES == 0 and batch % batch_shards == 0
            and heads % head_shards == 0 and kv_heads % head_shards == 0)
    return 'splash' if fits else 'xla'
  return 'xla'


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL=None, scale=None, *, mesh=None):
  """Causal self-attention [B, L, N, H] (K divides N), within segments when given, by the
  implementation the default backend and the model's `mesh` allow."""
  platform, capability = current_platform()
  choice = implementation(platform, q_BxLxNxH.dtype, q_BxLxNxH.shape, v_BxLxKxH.shape,
                          segments=segments_BxL is not None, cuda_capability=capability,
                          shards=mesh_shards(mesh))
  if choice == 'splash':
    return splash_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, scale, mesh=mesh)
  return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                      mask=same_segment(segments_BxL), is_causal=True,
                                      scale=scale, implementation=choice)


def same_segment(segments_BxL):
  """Attention mask [B, 1, L, L]: query and key in the same segment (None: no segments)."""
  if segments_BxL is None:
    return None
  return segments_BxL[:, None, :, None] == segments_BxL[:, None, None, :]


def current_platform() -> tuple[str, tuple[int, int] | None]:
  """The default backend's platform and, on an NVIDIA GPU, its compute capability."""
  backend = jax_backend.get_backend()
  # As jax's cuDNN wrapper tells CUDA from ROCm (both are platform 'gpu').
  if backend.platform != 'gpu' or 'cuda' not in backend.platform_version:
    return backend.platform, None
  major, minor = backend.local_devices()[0].compute_capability.split('.')
  return 'gpu', (int(major), int(minor))


def mesh_shards(mesh) -> tuple[int, int]:
  """How many ways `mesh` splits attention's batch and heads (1, 1 without a mesh)."""
  return sharding.shards(mesh, 'batch'), sharding.shards(mesh, 'heads')


def splash_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxV, segments_BxL=None, scale=None, *,
                     mesh=None, interpret: bool = False):
  """Causal self-attention [B, L, N, V] by the splash kernel (L a multiple of 128), on each
  device's block of batch and heads of `mesh`. `interpret` runs the kernel on any backend
  (for tests)."""
  scale = q_BxLxNxH.shape[-1] ** -0.5 if scale is None else scale

  def local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxV, segments_BxL):
    _, length, heads, _ = q_BxLxNxH.shape
    block = math.gcd(length, SPLASH_BLOCK)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    ids = None if segments_BxL is None else splash.SegmentIds(segments_BxL, segments_BxL)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    # The kernel takes one sequence, heads first, and does not scale the logits itself.
    out_BxNxLxV = jax.vmap(kernel)(heads_first(q_BxLxNxH * scale), heads_first(k_BxLxKxH),
                                   heads_first(v_BxLxKxV), segment_ids=ids)
    return heads_first(out_BxNxLxV)

  if mesh is None:
    return local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxV, segments_BxL)
  # GSPMD cannot split a Pallas kernel: each device runs it on its block of batch and heads.
  heads_spec = sharding.spec(mesh, 'batch', None, 'heads', None)
  # check_vma=False: the kernel's outputs carry no record of the mesh axes they vary over.
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(heads_spec, heads_spec, heads_spec, sharding.spec(mesh, 'batch')),
                       out_specs=heads_spec, check_vma=False)(
                           q_BxLxNxH, k_BxLxKxH, v_BxLxKxV, segments_BxL)
