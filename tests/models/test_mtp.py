"""Multi-token prediction: each depth equals the paper's formulas position by position, and
modules added after the main model leave the main model as it was."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moetrain import config as config_lib
from moetrain.models import layout
from moetrain.models.transformer import Transformer, init_cache
from moetrain.steps import loss_and_metrics

SMALL = ['--config.model.vocab_size=64', '--config.model.max_seq_len=32',
         '--config.train.seq_len=16']
TOKENS_BxL = np.random.default_rng(0).integers(1, 64, (2, 16)).astype(np.int32)


def _model(mtp_layers: int, *overrides):
  config = config_lib.load('configs/tiny_deepseek_v3.py',
                           SMALL + [f'--config.model.mtp_layers={mtp_layers}', *overrides])
  return Transformer(config.model, rngs=nnx.Rngs(0)), config


def _rms_norm(x_D, scale_D, eps):
  return x_D / np.sqrt(np.mean(x_D * x_D) + eps) * scale_D


def test_each_depth_equals_the_papers_formulas_position_by_position():
  """h'_i = W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], h^k = Block_k(h'),
  logits^k_i = Head(RMSNorm_k(h^k_i)), with h^0 the main model's last block output."""
  model, config = _model(2)
  eps = config.model.norm_eps
  tokens_BxL = jnp.asarray(TOKENS_BxL)
  mask_BxL = jnp.ones(tokens_BxL.shape, bool)
  positions_BxL = jnp.broadcast_to(jnp.arange(16), (2, 16))

  @jax.jit
  def run(tokens_BxL, mask_BxL):
    hidden = model._hidden(tokens_BxL, (positions_BxL, None, mask_BxL, 0.0, False, None))[0]
    return model.forward_mtp(tokens_BxL, mask_BxL, 0.0)[1], hidden
  logits_DxBxLxV, h_BxLxD = jax.device_get(run(tokens_BxL, mask_BxL))
  embed_VxD, head_DxV = np.asarray(model.embed[...]), np.asarray(model.unembed[...])
  b, l = TOKENS_BxL.shape
  for k, module in enumerate(model.mtp, start=1):
    combined_BxLxD = np.zeros_like(h_BxLxD)
    for row in range(b):
      for i in range(l - k):  # the last k positions have no token t_{i+k}
        e_D = _rms_norm(embed_VxD[TOKENS_BxL[row, i + k]], np.asarray(module.enorm.scale[...]),
                        eps)
        h_D = _rms_norm(h_BxLxD[row, i], np.asarray(module.hnorm.scale[...]), eps)
        combined_BxLxD[row, i] = np.concatenate([e_D, h_D]) @ np.asarray(module.eh_proj[...])
    # The block is the model's own (tested as such); what runs before and after it is checked.
    mask_k_BxL = jnp.asarray(np.arange(l) < l - k)[None].repeat(b, 0)
    block = jax.jit(lambda x, mask: module.block(x, positions_BxL, None, mask, 0.0, False,
                                                 None)[0])
    h_BxLxD = np.asarray(block(jnp.asarray(combined_BxLxD), mask_k_BxL))
    for row in range(b):
      for i in range(l - k):
        expected_V = _rms_norm(h_BxLxD[row, i], np.asarray(module.norm.scale[...]),
                               eps) @ head_DxV
        np.testing.assert_allclose(logits_DxBxLxV[k - 1, row, i], expected_V, rtol=1e-5,
                                   atol=1e-5, err_msg=f'depth {k}, row {row}, position {i}')


def test_the_main_model_is_the_same_with_and_without_prediction_modules():
  with_mtp, config = _model(1)
  without, _ = _model(0)
  params = layout.to_layers(nnx.to_pure_dict(nnx.state(with_mtp, nnx.Param)), config.model)
  main = layout.to_layers(nnx.to_pure_dict(nnx.state(without, nnx.Param)), config.model)
  # The module's block is numbered after the main layers, its other arrays under mtp/0/.
  extra = sorted(set(params) - set(main))
  assert {name.split('/')[0] + '/' + name.split('/')[1] for name in extra} == {'blocks/3',
                                                                              'mtp/0'}
  for name, value in main.items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)
  batch = {'inputs': TOKENS_BxL, 'targets': np.roll(TOKENS_BxL, -1, axis=1)}
  # Evaluation (train=False) ignores the modules: the same loss and metrics, bit for bit.
  evaluate = jax.jit(lambda model: loss_and_metrics(model, batch, config.model, 1.0)[1])
  expected, got = evaluate(without), evaluate(with_mtp)
  assert sorted(got) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  # Decoding never runs the modules, so they get no key/value cache.
  init_cache(with_mtp, 1, 8)
  cached = {path[0] for path, _ in nnx.iter_graph(with_mtp) if path and path[-1] == 'cache_k'}
  assert cached == {'blocks'}
