"""Rotary frequencies for long contexts equal the reference implementation's (transformers)."""

import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain.convert import families
from moetrain.models import rope

transformers = pytest.importorskip('transformers')
pytest.importorskip('torch')
from transformers import modeling_rope_utils  # noqa: E402

# The rope settings of released models (their config.json), at the dimension they rotate.
CASES = {
    'deepseek_v3_yarn': ('DeepseekV3Config', dict(
        qk_rope_head_dim=64, rope_scaling=dict(
            type='yarn', factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0), max_position_embeddings=163840)),
    'yarn_without_mscale': ('Qwen3MoeConfig', dict(
        head_dim=128, rope_theta=1e6, max_position_embeddings=131072, rope_scaling=dict(
            rope_type='yarn', factor=4.0, original_max_position_embeddings=32768))),
    'llama3_1': ('LlamaConfig', dict(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
        max_position_embeddings=131072, rope_scaling=dict(
            rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192))),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_frequencies_and_attention_factor_equal_transformers(name):
  config_class, values = CASES[name]
  hf_config = getattr(transformers, config_class)(**values)
  rope_type = hf_config.rope_parameters['rope_type']
  expected_freq, expected_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](
      hf_config, 'cpu')
  model = families.config_from_hf(hf_config.to_dict()).model
  dim = model.qk_rope_head_dim if model.attention == 'mla' else (
      model.head_dim or model.d_model // model.num_heads)
  inv_freq, factor = rope.frequencies(dim, model.rope_theta, model.rope_scaling)
  np.testing.assert_allclose(inv_freq, expected_freq.numpy(), rtol=1e-6)
  assert factor == pytest.approx(expected_factor, rel=1e-7)
  if rope_type != 'default':  # the scaling did change some frequencies
    plain, _ = rope.frequencies(dim, model.rope_theta, config_lib.default_config().model
                                .rope_scaling)
    assert not np.allclose(inv_freq, plain)


def test_mla_softmax_scale_includes_yarns_mscale():
  scaling = config_lib.default_config().model.rope_scaling
  assert rope.softmax_scale(192, scaling) == 192 ** -0.5
  scaling.type, scaling.factor, scaling.mscale_all_dim = 'yarn', 40.0, 1.0
  mscale = 0.1 * np.log(40.0) + 1.0  # DeepSeek-V3's yarn_get_mscale(40, 1)
  assert rope.softmax_scale(192, scaling) == pytest.approx(192 ** -0.5 * mscale ** 2)
