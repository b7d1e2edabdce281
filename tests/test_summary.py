"""The startup summary: parameter counts, active parameters, FLOPs and memory per device."""

import math

import jax
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain import summary
from moetrain.parallel.mesh import make_mesh
from moetrain.state import abstract_state, build_model, init_state, make_setup


@pytest.mark.parametrize('config_file', ['configs/tiny.py', 'configs/tiny_qwen2_moe.py',
                                         'configs/tiny_deepseek_v3.py'])
def test_parameter_count_equals_the_built_models(config_file):
  model_config = config_lib.load(config_file).model
  params = nnx.state(build_model(model_config, 0), nnx.Param)
  real = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert summary.parameter_counts(model_config)['total'] == real


def test_active_parameters_of_eight_experts_top_two_by_hand():
  model_config = config_lib.load('configs/tiny.py').model  # E8 top-2, 4 layers, tied
  embedding = 8000 * 128
  attention = 128 * 4 * 32 * 2 + 128 * 2 * 32 * 2  # wq, wo; wk, wv (2 kv heads)
  norms, router, expert = 2 * 128, 128 * 8, 3 * 128 * 256
  per_layer_total = attention + norms + router + 8 * expert
  per_layer_active = attention + norms + router + 2 * expert
  counts = summary.parameter_counts(model_config)
  assert counts['embedding'] == embedding
  assert counts['total'] == embedding + 4 * per_layer_total + 128  # + final norm
  assert counts['active'] == embedding + 4 * per_layer_active + 128
  assert counts['fp8'] == 4 * (attention + 2 * expert)  # what model.fp8 multiplies in FP8
  # Training FLOPs: 6 per active matmul weight (the tied output layer included) + attention.
  matmul = counts['active']  # the lookup is no matmul, but the tied output layer is one
  assert summary.flops_per_token(model_config, 256) == 6 * matmul + 6 * 4 * 256 * 2 * 4 * 32


@pytest.mark.parametrize('mesh', [dict(data=8), dict(data=1, fsdp=4, expert=2)])
def test_memory_estimate_matches_the_arrays_one_device_holds(mesh):
  config = config_lib.load('configs/tiny.py', [f'--config.mesh.{a}={s}' for a, s in mesh.items()])
  setup = make_setup(config, make_mesh(config))
  with jax.set_mesh(setup.mesh):
    state = init_state(setup)
    estimate = summary.memory_per_device(setup, abstract_state(setup))
  device = jax.devices()[0]

  def held(tree):
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)
  for part, key in (('params', 'params'), ('opt_state', 'optimizer')):
    assert math.isclose(estimate[key], held(state[part]), rel_tol=0.2), (part, estimate[key],
                                                                         held(state[part]))
  lines = summary.describe(setup, abstract_state(setup))
  assert any('active per token' in line for line in lines)
