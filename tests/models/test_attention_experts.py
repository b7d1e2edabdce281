"""Attention experts (BAM): the layer against a slow per-expert reference, one sharded step
against one device, and the conversion that cannot express them."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moetrain import checkpoint, generate, summary
from moetrain import config as config_lib
from moetrain.models.attention import Attention
from moetrain.models.transformer import Transformer
from moetrain.state import build_model
from tests import test_generate
from tests.steps import first_gradients, random_batch

X_BxLxD = jax.random.normal(jax.random.key(1), (2, 8, 16))
POSITIONS_BxL = jnp.broadcast_to(jnp.arange(8), (2, 8))


def layer_config(experts=0, share_kv=False, **model):
  m = config_lib.default_config().model
  m.d_model, m.num_heads, m.num_kv_heads = 16, 4, 2  # GQA: 2 query heads per K/V head
  m.attention_experts, m.attention_experts_share_kv = experts, share_kv
  for key, value in model.items():
    m[key] = value
  return m


def perturbed_params(config, seed):
  """The layer's params, every one (biases, norm scales, router) moved off its initial value."""
  params = nnx.to_pure_dict(nnx.state(Attention(config, rngs=nnx.Rngs(seed)), nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape)
                                   for v, k in zip(leaves, keys)])


def attention(config, params, x_BxLxD):
  """The Attention layer of `config` with `params` on x [B, L, D]."""
  graphdef, state = nnx.split(Attention(config, rngs=nnx.Rngs(0)), nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(x_BxLxD, POSITIONS_BxL)


def expert_params(params, a, n, kv, share_kv):
  """Expert a's params as a plain (attention_experts=0) layer's: its slice of every head axis."""
  heads = slice(a * n, (a + 1) * n)
  kv_heads = slice(None) if share_kv else slice(a * kv, (a + 1) * kv)
  out = {'wq': params['wq'][:, heads], 'wo': params['wo'][heads],
         'wk': params['wk'][:, kv_heads], 'wv': params['wv'][:, kv_heads]}
  if 'q_bias' in params:
    out.update(q_bias=params['q_bias'][heads], k_bias=params['k_bias'][kv_heads],
               v_bias=params['v_bias'][kv_heads])
  if 'q_norm' in params:
    k_scale = params['k_norm']['scale']
    out.update(q_norm={'scale': params['q_norm']['scale'][a]},
               k_norm={'scale': k_scale if share_kv else k_scale[a]})
  return out


def reference(config, params, x_BxLxD):
  """Σ_a softmax(x·router)_a · Attention_a(x), each expert computed alone by the plain layer."""
  plain = layer_config(**{k: config[k] for k in ('qk_norm', 'attention_bias')})
  weights_BxLxA = jax.nn.softmax(x_BxLxD @ params['attention_router'], axis=-1)
  outputs = [attention(plain, expert_params(params, a, config.num_heads, config.num_kv_heads,
                                            config.attention_experts_share_kv), x_BxLxD)
             for a in range(config.attention_experts)]
  return sum(weights_BxLxA[..., a, None] * y for a, y in enumerate(outputs))


@pytest.mark.parametrize('experts, share_kv, model', [
    (2, False, {'qk_norm': 'per_head', 'attention_bias': True}),
    (3, True, {'qk_norm': 'full'}),
    (2, True, {'attention_bias': True}),
])
def test_layer_equals_the_mixture_of_separate_attentions(experts, share_kv, model):
  """Values and gradients (params and input) of the one A·N-head attention equal the router's
  softmax mixture of A plain attentions, with GQA, a random router, with and without shared
  keys/values."""
  config = layer_config(experts, share_kv, **model)
  params = perturbed_params(config, 3)
  cotangent_BxLxD = jax.random.normal(jax.random.key(4), X_BxLxD.shape)
  objective = lambda f: lambda p, x: jnp.sum(f(config, p, x) * cotangent_BxLxD)
  run = lambda f: jax.jit(jax.value_and_grad(objective(f), argnums=(0, 1)))(params, X_BxLxD)
  (value, grads), (want, want_grads) = run(attention), run(reference)
  outputs = jax.jit(lambda p: (attention(config, p, X_BxLxD), reference(config, p, X_BxLxD)))
  np.testing.assert_allclose(*outputs(params), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, want_grads)


def test_zero_experts_build_the_plain_layer():
  """attention_experts=0 draws the same params as before the feature (no router, same shapes)."""
  params = nnx.to_pure_dict(nnx.state(Attention(layer_config(), rngs=nnx.Rngs(0)), nnx.Param))
  assert {k: v.shape for k, v in params.items()} == {
      'wq': (16, 4, 4), 'wk': (16, 2, 4), 'wv': (16, 2, 4), 'wo': (4, 4, 16)}


def test_cached_decoding_equals_the_forward_pass():
  """Generation's key/value cache holds the shared keys and values as each expert meets them:
  cached greedy decoding of a scanned model picks the forward pass's tokens."""
  config = test_generate.model_config(scan=True)
  config.num_kv_heads, config.attention_experts, config.attention_experts_share_kv = 1, 2, True
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  new = generate.generate(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers),
                          [5, 9, 2], num_tokens=4)
  row = np.array([[5, 9, 2] + new])
  logits_BxLxV = nnx.jit(lambda model, row: model(row))(model, row)
  assert new == np.asarray(jnp.argmax(logits_BxLxV[0, 2:-1], axis=-1)).tolist()


def mesh_config(data, fsdp, tensor):
  return config_lib.load('configs/tiny.py', [
      '--config.model.vocab_size=128', '--config.model.d_model=32', '--config.model.d_ff=64',
      '--config.model.num_layers=2', '--config.model.max_seq_len=16',
      '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
      '--config.model.attention_experts=2', '--config.model.attention_experts_share_kv=True',
      '--config.model.moe.num_experts=4', '--config.train.batch_size=8',
      '--config.train.seq_len=16', f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
      '--config.mesh.expert=1', f'--config.mesh.tensor={tensor}'])


def test_sharded_step_equals_single_device():
  """Loss and gradients of a model with (shared-K/V) attention experts on data=2 × fsdp=2 ×
  tensor=2 equal one device's: the experts' heads split over `tensor` like any heads."""
  batch = random_batch(mesh_config(1, 1, 1))
  (single_grads, single, _), _ = first_gradients(mesh_config(1, 1, 1), jax.devices()[:1], batch)
  (grads, metrics, _), _ = first_gradients(mesh_config(2, 2, 2), jax.devices()[:8], batch)
  np.testing.assert_allclose(metrics['loss'], single['loss'], rtol=2e-5)
  router = grads['blocks'][0]['attention']['attention_router']
  assert np.abs(router).max() > 0  # the router learns
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, single_grads)


def test_moetrain_to_hf_refuses_attention_experts(tmp_path, capsys):
  """No Hugging Face family has attention experts: one line naming the field, exit 2."""
  config = mesh_config(1, 1, 1)
  _, params, buffers = nnx.split(build_model(config.model, 0), nnx.Param, ...)
  pure = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  checkpoint.save_model(tmp_path / 'ckpt', pure(params), pure(buffers), config)
  spec = importlib.util.spec_from_file_location(
      'convert_checkpoint', pathlib.Path(__file__).resolve().parents[2] / 'tools'
      / 'convert_checkpoint.py')
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  capsys.readouterr()
  assert tool.main(['moetrain-to-hf', str(tmp_path / 'ckpt'), str(tmp_path / 'hf')]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and 'model.attention_experts=2' in lines[0], lines
  assert not (tmp_path / 'hf').exists()


def test_flops_count_every_experts_heads():
  """The attention FLOPs per token (scores and weighted sums) are those of A·N query heads."""
  def attention_flops(model_config):
    counts = summary.parameter_counts(model_config)
    return (summary.flops_per_token(model_config, 16, counts)
            - 6 * summary.matmul_weights(model_config, counts))
  model_config = mesh_config(1, 1, 1).model
  plain = model_config.copy_and_resolve_references()
  plain.attention_experts, plain.attention_experts_share_kv = 0, False
  assert attention_flops(model_config) == 2 * attention_flops(plain) > 0
