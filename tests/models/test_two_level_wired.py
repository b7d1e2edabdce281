"""A model whose mesh spans two nodes (`model.moe.exchange_nodes`) takes the two-level exchange:
its compiled step fans tokens out inside the nodes, and one step gives one device's results."""

import functools

import jax
import numpy as np
import pytest

from tests.models.test_two_level import inter_and_other_all_to_all_bytes
from tests.parallel.test_expert_parallel import first_step, small_config
from tests.steps import compiled_train_step

# Capacity factor 2: experts still drop, the node capacity holds every token (so the two-level
# step keeps what one device keeps).
ROOMY = ['--config.model.moe.capacity_factor=2.0']
ROUTING = {'softmax': [], 'sigmoid_groups_priority_chunks': [
    '--config.model.moe.router=sigmoid', '--config.model.moe.bias_update_rate=0.01',
    '--config.model.moe.num_groups=2', '--config.model.moe.topk_groups=1',
    '--config.model.moe.drop_policy=priority', '--config.model.moe.exchange_chunks=2']}


# Each routing on one layout (both layouts are also checked layer by layer, test_two_level.py).
@pytest.mark.parametrize('routing,layout', [('softmax', (1, 1, 8, 1)),
                                            ('sigmoid_groups_priority_chunks', (1, 2, 2, 2))],
                         ids=['2x4-softmax', '2x1-fsdp-tp-sigmoid_groups_priority_chunks'])
def test_two_node_step_equals_single_device(routing, layout):
  single_grads, single, single_buffers = first_step(small_config(*ROOMY, *ROUTING[routing]),
                                                    jax.devices()[:1])
  mesh = [f'--config.mesh.{axis}={n}' for axis, n in zip(('data', 'fsdp', 'expert', 'tensor'),
                                                         layout)]
  grads, metrics, buffers = first_step(
      small_config(*ROOMY, *ROUTING[routing], *mesh, '--config.model.moe.exchange_nodes=2'),
      jax.devices()[:8])
  assert single['dropped_fraction'].max() > 0
  for key in ('loss', 'aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
    np.testing.assert_allclose(metrics[key], single[key], rtol=2e-5, atol=1e-6, err_msg=key)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7)
  jax.tree.map(close, grads, single_grads)
  jax.tree.map(close, buffers, single_buffers)


def test_compiled_two_node_step_exchanges_inside_and_across_nodes():
  config = small_config(*ROOMY, '--config.mesh.data=1', '--config.mesh.expert=8',
                        '--config.model.moe.exchange_nodes=2')
  hlo = compiled_train_step(config, jax.devices()[:8])
  inter, intra = inter_and_other_all_to_all_bytes(hlo, {d: d // 4 for d in range(8)})
  assert inter > 0 and intra > 0  # the flat exchange has no all-to-all inside a node
