"""Rotary position embeddings: frequencies (plain, YaRN, Llama 3 scaling) and the rotation.

The formulas follow the papers and the Hugging Face reference implementations, so converted
checkpoints give the same logits: YaRN (Peng et al. 2023) as DeepSeek-V3 uses it, and Llama 3.1's
frequency-dependent interpolation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def frequencies(rotary_dim: int, theta: float, scaling) -> tuple[np.ndarray, float]:
  """(inverse frequencies [rotary_dim / 2] float32, factor multiplying cos and sin).

  `scaling` is the `model.rope_scaling` section (type none | yarn | llama3).
  """
  inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
  if scaling.type == 'yarn':
    return _yarn(inv_freq, rotary_dim, theta, scaling)
  if scaling.type == 'llama3':
    return _llama3(inv_freq, scaling), 1.0
  return inv_freq.astype(np.float32), 1.0


def _yarn(inv_freq, dim, theta, s):
  """Interpolates low frequencies by `factor`, keeps high ones, ramps in between."""
  def correction_dim(rotations):
    return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))
  low = max(math.floor(correction_dim(s.beta_fast)), 0)
  high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
  high = high + 0.001 if high == low else high  # as the reference: avoids a zero division
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp
  scaled = inv_freq / s.factor * (1 - keep) + inv_freq * keep
  if s.mscale and s.mscale_all_dim:
    attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
  else:
    attention_factor = _yarn_mscale(s.factor)
  return scaled.astype(np.float32), float(attention_factor)


def _llama3(inv_freq, s):
  """Llama 3.1: long wavelengths divided by `factor`, short ones kept, smooth in between."""
  low_wavelen = s.original_max_seq_len / s.low_freq_factor
  high_wavelen = s.original_max_seq_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def softmax_scale(head_dim: int, scaling) -> float:
  """1/sqrt(head_dim), times YaRN's mscale(factor, mscale_all_dim)² (DeepSeek's MLA)."""
  scale = head_dim ** -0.5
  if scaling.type == 'yarn' and scaling.mscale_all_dim:
    scale *= _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
  return scale


def rotate(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq, attention_factor=1.0):
  """Rotates channel pairs (i, i + H/2) by position · inv_freq (GPT-NeoX / Llama layout)."""
  angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  sin = (jnp.sin(angles_BxLxH2) * attention_factor)[:, :, None, :]
  cos = (jnp.cos(angles_BxLxH2) * attention_factor)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)
