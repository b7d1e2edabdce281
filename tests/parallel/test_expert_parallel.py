"""Expert parallelism: tokens travel to the experts' owners by all_to_all, and every routing
scheme gives the single-device results on meshes that split the experts."""

import functools
import re

import jax
import numpy as np
import pytest

from moetrain import config as config_lib
from tests.steps import compiled_train_step, first_gradients, random_batch

SMALL = ['--config.model.vocab_size=64', '--config.model.d_model=32', '--config.model.d_ff=48',
         '--config.model.num_layers=2', '--config.model.max_seq_len=16',
         '--config.train.batch_size=16', '--config.train.seq_len=16',
         '--config.model.moe.capacity_factor=1.0', '--config.train.sample_tokens=0']


def small_config(*overrides):
  return config_lib.load('configs/tiny.py', SMALL + list(overrides))


def first_step(config, devices):
  """Gradients, metrics and updated buffers of one step of `config` on `devices`."""
  return first_gradients(config, devices, random_batch(config))[0]


ROUTERS = {
    'expert_choice': ['--config.model.moe.router=expert_choice'],
    'dropless_shared_gated': ['--config.model.moe.capacity_factor=0',
                              '--config.model.moe.num_shared_experts=1',
                              '--config.model.moe.shared_expert_gate=true'],
    'sigmoid_bias_groups_priority': [
        '--config.model.moe.router=sigmoid', '--config.model.moe.bias_update_rate=0.01',
        '--config.model.moe.num_groups=4', '--config.model.moe.topk_groups=2',
        '--config.model.moe.drop_policy=priority', '--config.model.moe.aux_loss=sequence'],
    'null_experts_einsum': ['--config.model.moe.num_null_experts=4',
                            '--config.model.moe.top_k=3', '--config.model.moe.dispatch=einsum'],
    'top_p_dynamic': ['--config.model.moe.router=top_p', '--config.model.moe.top_k=4',
                      '--config.model.moe.dynamic_loss_weight=0.01'],
    # 12 router outputs on 8 experts (merged experts): a token can send two slots to one.
    'merged_router_map_bias': ['--config.model.moe.router_outputs=12',
                               '--config.model.moe.bias_update_rate=0.01'],
}


@pytest.mark.parametrize('router', ROUTERS)
def test_routing_scheme_on_expert_parallel_mesh_equals_single_device(router):
  single_grads, single, single_buffers = first_step(
      small_config(*ROUTERS[router]), jax.devices()[:1])
  layout = ['--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2',
            '--config.mesh.tensor=2']
  grads, metrics, buffers = first_step(small_config(*ROUTERS[router], *layout),
                                       jax.devices()[:8])
  for key in ('loss', 'aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
    np.testing.assert_allclose(metrics[key], single[key], rtol=2e-5, atol=1e-6, err_msg=key)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7)
  jax.tree.map(close, grads, single_grads)
  jax.tree.map(close, buffers, single_buffers)  # the router bias update too


def all_gathered_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in compiled HLO text."""
  shapes = []
  for line in hlo_text.splitlines():
    match = re.search(r'=(.*?)\sall-gather(-start)?\(', line)
    if match:
      shapes += [tuple(int(n) for n in dims.split(',')) if dims else ()
                 for dims in re.findall(r'\[([\d,]*)\]', match.group(1))]
  return shapes


def test_compiled_step_exchanges_tokens_and_never_gathers_expert_weights():
  config = small_config('--config.mesh.data=1', '--config.mesh.expert=8')
  hlo = compiled_train_step(config, jax.devices()[:8])
  assert 'all-to-all' in hlo
  experts, d, f = config.model.moe.num_experts, config.model.d_model, config.model.d_ff
  gathered = all_gathered_shapes(hlo)
  whole_experts = [s for s in gathered if s[-3:] in ((experts, d, f), (experts, f, d))]
  assert not whole_experts, whole_experts
  assert all_gathered_shapes('%g = f32[8,32,48]{2,1,0} all-gather(f32[1,32,48]{2,1,0} %p)') == [
      (8, 32, 48)]  # the parser sees an all-gather of whole experts where there is one


@pytest.mark.parametrize('router', ['sigmoid_bias_groups_priority', 'expert_choice'])
def test_each_device_routes_its_own_groups(router):
  """No collective carries router scores: every top_k runs on the device's own groups (XLA's
  partitioners would gather all groups' scores onto every device, in every MoE layer)."""
  config = small_config(*ROUTERS[router], '--config.mesh.data=1', '--config.mesh.fsdp=2',
                        '--config.mesh.expert=4')
  hlo = compiled_train_step(config, jax.devices()[:8])
  routing_collectives = [line for line in hlo.splitlines()
                         if re.search(r'= \S+ (all-gather|all-reduce|all-to-all)(-start)?\(', line)
                         and re.search(r'op_name="[^"]*top_k"', line)]
  assert not routing_collectives, routing_collectives
