"""Upcycling dense → MoE: the first forward pass equals the dense model, per-init invariants."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain import upcycle
from moetrain.models import layout
from moetrain.state import build_model

TOKENS_BxL = np.asarray(jax.random.randint(jax.random.key(7), (2, 12), 0, 64))


def dense_config(**model):
  m = config_lib.default_config().model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 64, 32, 2, 4, 4
  m.d_ff, m.max_seq_len, m.dtype, m.param_dtype = 48, 32, 'float32', 'float32'
  m.moe.num_experts = 0
  for key, value in model.items():
    m[key] = value
  return m


def moe_config(model=None, **moe):
  m = dense_config(**(model or {}))
  m.moe.num_experts, m.moe.top_k, m.moe.norm_topk_prob = 4, 2, True
  for key, value in moe.items():
    m.moe[key] = value
  return m


def init_config(**fields):
  init = config_lib.default_config().init
  for key, value in fields.items():
    init[key] = value
  return init


def flat_params(model_config, seed):
  """Flat numpy params of a freshly built model."""
  _, params, _ = nnx.split(build_model(model_config, seed), nnx.Param, ...)
  flat = layout.to_layers(nnx.to_pure_dict(params), model_config)
  return {name: np.asarray(value) for name, value in flat.items()}


def logits(model_config, flat, seed=0):
  """The model's logits on TOKENS_BxL with `flat` params (buffers as built)."""
  graphdef, params, buffers = nnx.split(build_model(model_config, seed), nnx.Param, ...)
  nnx.replace_by_pure_dict(params, layout.from_layers(dict(flat), model_config))
  return np.asarray(nnx.merge(graphdef, params, buffers)(TOKENS_BxL))


def upcycled(dense_flats, moe, init, seed=1):
  return upcycle.upcycle(dense_flats, flat_params(moe, seed), moe, init, jax.random.key(3))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize('moe', [
    {},
    {'first_dense_layers': 1},
    {'num_shared_experts': 1, 'shared_expert_gate': True},
    {'num_shared_experts': 1, 'shared_expert_gate': False},
    {'router': 'sigmoid', 'routed_scaling_factor': 2.5},
    {'num_null_experts': 1},
    {'bias_update_rate': 1e-3},
])
def test_copy_equals_dense(moe):
  dense = dense_config()
  dense_flat = flat_params(dense, 0)
  moe_cfg = moe_config(**moe)
  params = upcycled([dense_flat], moe_cfg, init_config(upcycle='copy'))
  assert max_diff(logits(moe_cfg, params), logits(dense, dense_flat)) <= 1e-5


def test_copy_without_renormalisation_differs():
  # Unrenormalised top-2 weights sum to < 1: the test above would catch a wrong scale.
  dense = dense_config()
  dense_flat = flat_params(dense, 0)
  moe_cfg = moe_config(norm_topk_prob=False)
  params = upcycled([dense_flat], moe_cfg, init_config(upcycle='copy'))
  assert max_diff(logits(moe_cfg, params), logits(dense, dense_flat)) > 1e-3


@pytest.mark.parametrize('moe, scale', [
    ({'top_k': 4}, 4.0),
    ({'top_k': 8}, 4.0),
    ({'top_k': 4, 'routed_scaling_factor': 2.0}, 2.0),
    ({'top_k': 4, 'num_shared_experts': 1, 'd_shared_expert': 48}, 2.0),
])
def test_granular_equals_dense(moe, scale):
  g, fe = 4, 12
  dense = dense_config()
  dense_flat = flat_params(dense, 0)
  moe_cfg = moe_config(num_experts=8, d_expert=fe, **moe)
  fresh = flat_params(moe_cfg, 1)
  params = upcycle.upcycle([dense_flat], fresh, moe_cfg, init_config(upcycle='granular'),
                           jax.random.key(3))
  assert max_diff(logits(moe_cfg, params), logits(dense, dense_flat)) <= 1e-5
  for layer in range(2):
    ffn = f'blocks/{layer}/ffn/'
    router_DxE = np.asarray(params[ffn + 'router'])
    for r in range(2):
      group_DxG = router_DxE[:, r * g:(r + 1) * g]
      np.testing.assert_array_equal(group_DxG, np.repeat(fresh[ffn + 'router'][:, r * g:][:, :1],
                                                         g, axis=1))
    assert not np.allclose(router_DxE[:, 0], router_DxE[:, g])
    for e in range(8):
      units = slice((e % g) * fe, (e % g + 1) * fe)
      np.testing.assert_array_equal(params[ffn + 'w_gate'][e], dense_flat[ffn + 'w_gate'][:, units])
      np.testing.assert_array_equal(params[ffn + 'w_up'][e], dense_flat[ffn + 'w_up'][:, units])
      np.testing.assert_allclose(params[ffn + 'w_down'][e],
                                 scale * dense_flat[ffn + 'w_down'][units], rtol=1e-6)


def changed_units(expert_w, dense_w, axis):
  """Hidden units where an expert's matrix differs from the dense one: [E, ...] → [E, F]."""
  return np.any(np.asarray(expert_w) != dense_w[None], axis=axis)


def test_drop_reinitialises_the_same_units():
  ratio, f = 0.3, 256
  dense = dense_config(d_model=64, d_ff=f, num_layers=1)
  dense_flat = flat_params(dense, 0)
  # Shifted means, so that the re-initialised values' mean is checked against a non-zero one.
  shift = {'w_gate': 0.05, 'w_up': -0.03, 'w_down': 0.02}
  for key, value in shift.items():
    dense_flat[f'blocks/0/ffn/{key}'] = dense_flat[f'blocks/0/ffn/{key}'] + value
  moe_cfg = moe_config(model={'d_model': 64, 'd_ff': f, 'num_layers': 1})
  params = upcycled([dense_flat], moe_cfg, init_config(upcycle='drop', drop_ratio=ratio))
  mlp = {key: dense_flat[f'blocks/0/ffn/{key}'] for key in shift}
  experts = {key: np.asarray(params[f'blocks/0/ffn/{key}']) for key in shift}
  units_ExF = changed_units(experts['w_gate'], mlp['w_gate'], axis=1)
  np.testing.assert_array_equal(units_ExF.sum(axis=1), round(ratio * f))
  np.testing.assert_array_equal(changed_units(experts['w_up'], mlp['w_up'], axis=1), units_ExF)
  np.testing.assert_array_equal(changed_units(experts['w_down'], mlp['w_down'], axis=2),
                                units_ExF)
  assert len({units.tobytes() for units in units_ExF}) == 4
  for key, w in experts.items():
    unit_axis = 2 if key != 'w_down' else 1
    mask = np.expand_dims(units_ExF, 3 - unit_axis)
    kept = np.broadcast_to(~mask, w.shape)
    np.testing.assert_array_equal(w[kept], np.broadcast_to(mlp[key][None], w.shape)[kept])
    fresh = w[~kept]
    assert abs(fresh.mean() - mlp[key].mean()) < 0.05 * mlp[key].std()
    assert abs(fresh.std() / mlp[key].std() - 1) < 0.05


@pytest.mark.parametrize('noise', [0.0, 0.05])
def test_noise(noise):
  dense = dense_config(d_ff=64)
  dense_flat = flat_params(dense, 0)
  moe_cfg = moe_config(model={'d_ff': 64})
  params = upcycled([dense_flat], moe_cfg, init_config(upcycle='copy', noise=noise))
  for key in ('w_gate', 'w_up', 'w_down'):
    dense_w = dense_flat[f'blocks/0/ffn/{key}']
    delta = (np.asarray(params[f'blocks/0/ffn/{key}']) - dense_w[None]) / dense_w.std()
    if noise == 0:
      assert not delta.any()
      continue
    assert abs(delta.std() / noise - 1) < 0.1 and abs(delta.mean()) < 0.1 * noise
    assert min(max_diff(delta[i], delta[j]) for i in range(4) for j in range(i)) > noise


def test_two_models_form_expert_groups_and_average_the_rest():
  model = {'tie_embeddings': False}
  dense = dense_config(**model)
  flat_a, flat_b = flat_params(dense, 0), flat_params(dense, 5)
  moe_cfg = moe_config(model=model, first_dense_layers=1)
  params = upcycled([flat_a, flat_b], moe_cfg, init_config(upcycle='copy'))
  assert 'unembed' in params
  for name, value in params.items():
    if name.startswith('blocks/1/ffn/'):
      continue
    np.testing.assert_allclose(value, (flat_a[name] + flat_b[name]) / 2, rtol=1e-6, atol=1e-9,
                               err_msg=name)
  for key in ('w_gate', 'w_up', 'w_down'):
    name = f'blocks/1/ffn/{key}'
    for e, source in enumerate((flat_a, flat_a, flat_b, flat_b)):
      np.testing.assert_array_equal(params[name][e], source[name], err_msg=f'{name}[{e}]')


@pytest.mark.parametrize('dense_model, models, moe, init, match', [
    ({'d_model': 48}, 1, {}, 'copy',
     r'parameter \S+: the dense model has shape \(.*48.*\), the MoE model expects \(.*32.*\)'),
    ({}, 3, {}, 'copy', r'num_experts=4 must be divisible by the 3 dense models'),
    ({}, 1, {'num_experts': 8, 'd_expert': 12, 'top_k': 2}, 'granular', r'top_k=2 .* G=4'),
    ({}, 1, {'num_experts': 8, 'd_expert': 12, 'top_k': 4, 'norm_topk_prob': False},
     'granular', r'norm_topk_prob'),
    ({}, 1, {'d_expert': 24}, 'copy', r'd_expert=24 must equal the dense d_ff=48'),
    ({}, 1, {'num_shared_experts': 1, 'd_shared_expert': 24}, 'copy', r'd_shared_expert'),
])
def test_errors(dense_model, models, moe, init, match):
  dense_flat = flat_params(dense_config(**dense_model), 0)
  with pytest.raises(ValueError, match=match):
    upcycled([dense_flat] * models, moe_config(**moe), init_config(upcycle=init))


def test_jit_matches_eager():
  dense = dense_config()
  dense_flat = flat_params(dense, 0)
  moe_cfg = moe_config(first_dense_layers=1)
  target = flat_params(moe_cfg, 1)
  init = ml_collections.FrozenConfigDict(init_config(upcycle='drop', noise=0.01, drop_ratio=0.25))
  eager = upcycle.upcycle([dense_flat], target, moe_cfg, init, jax.random.key(3))
  run = jax.jit(lambda dense, target, rng: upcycle.upcycle(dense, target, moe_cfg, init, rng))
  jitted = run([jax.tree.map(jnp.asarray, dense_flat)], jax.tree.map(jnp.asarray, target),
               jax.random.key(3))
  assert jitted.keys() == eager.keys() == target.keys()
  for name in target:
    np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-6, atol=1e-8, err_msg=name)


def perturbed(flat, seed):
  """`flat` with every param moved off its initial value (biases, norm scales included)."""
  rng = np.random.default_rng(seed)
  return {name: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype)
          for name, v in flat.items()}


def model_with(model_config, flat):
  graphdef, params, buffers = nnx.split(build_model(model_config, 0), nnx.Param, ...)
  nnx.replace_by_pure_dict(params, layout.from_layers(dict(flat), model_config))
  return nnx.merge(graphdef, params, buffers)


def attention_of(model_config, flat, layer, x_BxLxD):
  """Block `layer`'s attention of the model with `flat` params on its input x [B, L, D]."""
  positions_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), x_BxLxD.shape[:2])
  return model_with(model_config, flat).blocks[layer].attention(x_BxLxD, positions_BxL)


@pytest.mark.parametrize('share_kv', [False, True])
def test_attention_experts_start_as_the_mean_of_the_dense_attentions(share_kv):
  """BAM's step-0 identity: the router starts at zeros, so each of the 2 attention experts
  weighs 1/2 and every upcycled attention layer gives mean_m Attn_m(x), Attn_m dense model m's
  attention (with share_kv: model m's queries and outputs over the models' mean K/V
  projections), on the upcycled model's own block input x. The averaged (BTX) attention
  gives something else."""
  model = {'num_kv_heads': 2, 'qk_norm': 'per_head', 'attention_bias': True}
  dense = dense_config(**model)
  flats = [perturbed(flat_params(dense, seed), seed) for seed in (0, 5)]
  bam = moe_config(model={**model, 'attention_experts': 2,
                          'attention_experts_share_kv': share_kv})
  params = upcycled(flats, bam, init_config(upcycle='copy'))
  btx_moe = moe_config(model=model)
  btx = upcycled(flats, btx_moe, init_config(upcycle='copy'))
  kv = ('wk', 'wv', 'k_bias', 'v_bias', 'k_norm/scale')
  shared = lambda name: share_kv and name.split('/attention/')[-1] in kv
  sources = [{name: (sum(f[name] for f in flats) / 2 if shared(name) else v)
              for name, v in flat.items()} for flat in flats]
  upcycled_model = model_with(bam, params)
  x_BxLxD = upcycled_model.blocks[0].attention_norm(upcycled_model._embed(TOKENS_BxL))
  for layer in range(bam.num_layers):
    want = sum(attention_of(dense, source, layer, x_BxLxD) for source in sources) / 2
    got = attention_of(bam, params, layer, x_BxLxD)
    assert max_diff(got, want) < 1e-5, layer
    assert max_diff(attention_of(btx_moe, btx, layer, x_BxLxD), want) > 1e-2, layer


def test_attention_experts_need_one_dense_model_each():
  dense_flat = flat_params(dense_config(), 0)
  with pytest.raises(ValueError, match=r'model.attention_experts=3 must equal the 2 dense'):
    upcycled([dense_flat] * 2, moe_config(model={'attention_experts': 3}), init_config())
