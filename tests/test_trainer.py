"""The train step: its batch sharding and optimizer details (every mesh layout equals one
device in tests/parallel/test_layouts.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax

from moetrain import config as config_lib
from moetrain import trainer
from moetrain.data.tokenizer import EOS_ID
from moetrain.parallel.mesh import make_mesh
from moetrain.state import build_model, decay_mask, init_state, make_optimizer, make_setup
from moetrain.steps import loss_and_metrics, make_train_step
from tests.steps import random_batch


def small_config(*overrides):
  return config_lib.load('configs/tiny.py', [
      '--config.model.vocab_size=128', '--config.model.d_model=32', '--config.model.d_ff=64',
      '--config.model.num_layers=2', '--config.model.max_seq_len=16',
      '--config.model.moe.num_experts=4', '--config.model.moe.capacity_factor=1.0',
      '--config.train.batch_size=16', '--config.train.seq_len=16',
      '--config.train.warmup_steps=0', '--config.train.learning_rate=1e-2', *overrides])


def batch_for(config, seed=0):
  return random_batch(config, seed, padding=5)


def test_batch_is_sharded_over_all_data_axes():
  config = small_config()
  mesh = make_mesh(config, jax.devices()[:8])
  setup = make_setup(config, mesh)
  batch = trainer.global_batch(setup, batch_for(config))
  assert {s.data.shape for s in batch['inputs'].addressable_shards} == {(2, 16)}


def test_weight_decay_spares_norms_and_biases():
  params = {'blocks': {0: {'attention_norm': {'scale': 1}, 'ffn': {'w_up': 2, 'router_bias': 3}}},
            'embed': 4}
  mask = decay_mask(params)
  assert mask == {'blocks': {0: {'attention_norm': {'scale': False},
                                 'ffn': {'w_up': True, 'router_bias': False}}}, 'embed': True}


def test_learning_rate_schedule_warms_up_then_decays():
  config = small_config('--config.train.warmup_steps=10', '--config.train.steps=100')
  _, schedule = make_optimizer(config.train)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 1e-3, rtol=1e-5)
  assert float(schedule(50)) < float(schedule(20))


def test_without_the_document_mask_tokens_attend_across_the_row():
  """train.document_mask=False (what cuDNN's fused attention can run): the loss is that of the
  plain forward pass over the whole row, end-of-document tokens and all."""
  config = small_config()
  model = build_model(config.model, 0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, config.model.vocab_size, (2, 17)).astype(np.int32)
  tokens[:, 6] = EOS_ID  # a second document starts in every row
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}
  plain = optax.softmax_cross_entropy_with_integer_labels(model(batch['inputs']),
                                                          batch['targets']).mean()
  loss = lambda mask: loss_and_metrics(model, batch, config.model, 0.0,
                                       document_mask=mask)[1]['loss']
  np.testing.assert_allclose(loss(False), plain, rtol=1e-6)
  assert abs(float(loss(True)) - float(plain)) > 1e-4


def _dot_dtypes(jaxpr, found):
  """(operand dtype, output dtype, output shape) of every dot_general, nested jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append((eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype,
                    eqn.outvars[0].aval.shape))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _dot_dtypes(inner, found)
  return found


def test_bfloat16_step_routes_and_scores_in_float32_and_donates_the_state():
  """model.dtype=bfloat16: the matmuls run in bf16; router logits and the loss in float32;
  the old state's buffers are given to the new one."""
  config = small_config('--config.model.dtype=bfloat16')
  setup = make_setup(config, make_mesh(config, jax.devices()[:1]))
  with jax.set_mesh(setup.mesh):
    state = init_state(setup)
    batch = trainer.global_batch(setup, batch_for(config))
    step = make_train_step(setup)
    dots = _dot_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr, [])
    experts = config.model.moe.num_experts
    assert any(a == jnp.bfloat16 and out == jnp.bfloat16 for a, out, _ in dots)
    router_dots = [(a, out) for a, out, shape in dots if shape[-1] == experts]
    assert router_dots and all(out == jnp.float32 for _, out in router_dots)
    old_leaves = jax.tree.leaves(state['params'])
    new_state, metrics = step(state, batch)
    assert metrics['loss'].dtype == jnp.float32 and np.isfinite(metrics['loss'])
    assert all(leaf.is_deleted() for leaf in old_leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state['params']))
