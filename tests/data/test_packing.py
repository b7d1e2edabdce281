"""Packed documents: segments and positions from end-of-document tokens, and isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain.data.packing import document_segments
from moetrain.data.tokenizer import EOS_ID
from moetrain.state import build_model

E = EOS_ID


def test_segments_start_at_each_end_of_document_token_and_positions_restart():
  rows = jnp.array([[7, 8, E, 9, 10, 11, E, 12],
                    [E, 5, 6, E, E, 4, 4, 4]])
  segments, positions = document_segments(rows, EOS_ID)
  np.testing.assert_array_equal(segments, [[1, 1, 2, 2, 2, 2, 3, 3],
                                           [2, 2, 2, 3, 4, 4, 4, 4]])
  np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2, 3, 0, 1],
                                            [0, 1, 2, 0, 0, 1, 2, 3]])


def _model(attention: str, scan: bool):
  config = config_lib.default_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff, m.num_layers = 64, 32, 4, 2, 48, 2
  m.scan_layers = scan
  m.attention = attention
  m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = (
      16, 16, 8, 4, 8)
  m.moe.num_experts, m.moe.top_k = 4, 2
  return build_model(m, seed=0)


@pytest.mark.parametrize('attention,scan', [('mha', False), ('mla', True)])
def test_a_packed_document_sees_only_itself(attention, scan):
  model = _model(attention, scan)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(4, 64, 5), rng.integers(4, 64, 6)
  packed = np.concatenate([doc_a, [E], doc_b])[None]  # the EOS ends a and begins b

  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, row):
    segments, positions = document_segments(row, EOS_ID)
    return nnx.merge(graphdef, state).forward(row, segments_BxL=segments,
                                              positions_BxL=positions)[0]

  def logits(row):
    return np.asarray(forward(state, jnp.asarray(row)))[0]
  together = logits(packed)
  np.testing.assert_allclose(together[:5], logits(doc_a[None]), atol=1e-5)
  np.testing.assert_allclose(together[5:], logits(np.concatenate([[E], doc_b])[None]),
                             atol=1e-5)
  # Another first document changes nothing in the second one's outputs.
  other = packed.copy()
  other[0, :5] = rng.integers(4, 64, 5)
  np.testing.assert_allclose(logits(other)[5:], together[5:], atol=1e-5)
  # Without segments the second document would see the first: the check can fail.
  plain = np.asarray(jax.jit(lambda state, row: nnx.merge(graphdef, state)(row))(
      state, jnp.asarray(packed)))[0]
  assert np.abs(plain[5:] - together[5:]).max() > 1e-3
