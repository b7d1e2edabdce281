"""Mesh shapes from config.mesh, the layout checks, and the logical → mesh sharding rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moetrain import config as config_lib
from moetrain.errors import ConfigError
from moetrain.parallel import sharding
from moetrain.parallel.mesh import make_mesh, mesh_shape, slice_grid
from moetrain.state import init_state, make_setup


def tiny(*overrides):
  return config_lib.load('configs/tiny.py', list(overrides))


@pytest.mark.parametrize('axes, devices, expected', [
    ({'data': -1}, 8, (1, 8, 1, 1, 1)),
    ({'data': -1, 'expert': 4}, 8, (1, 2, 1, 4, 1)),
    ({'data': 2, 'fsdp': 2, 'expert': 2}, 8, (1, 2, 2, 2, 1)),
    ({'data': 1, 'tensor': -1}, 4, (1, 1, 1, 1, 4)),
    ({'stage': 2, 'data': -1, 'expert': 2}, 8, (2, 2, 1, 2, 1)),
])
def test_mesh_shape_fills_the_minus_one_axis(axes, devices, expected):
  config = tiny('--config.model.scan_layers=true', '--config.train.microbatches=2',
               *(f'--config.mesh.{axis}={size}' for axis, size in axes.items()))
  assert mesh_shape(config.mesh, devices) == expected


def test_mesh_shape_errors_name_the_axes():
  with pytest.raises(ConfigError, match='data=-1 fsdp=3 .* does not divide the 8 available'):
    mesh_shape(tiny('--config.mesh.fsdp=3').mesh, 8)
  with pytest.raises(ConfigError, match='needs 2 devices, but 8 are available'):
    mesh_shape(tiny('--config.mesh.data=2').mesh, 8)


def test_layout_checks_name_the_fields():
  with pytest.raises(ConfigError, match='model.moe.num_experts=8 must be divisible by mesh.expert=16'):
    make_mesh(tiny('--config.mesh.expert=16', '--config.train.batch_size=16'),
              jax.devices()[:1] * 16)
  with pytest.raises(ConfigError, match='model.num_kv_heads=2 must be divisible by mesh.tensor=4'):
    make_mesh(tiny('--config.mesh.tensor=4', '--config.mesh.data=2'), jax.devices()[:8])


def test_rules_map_logical_axes_to_mesh_axes():
  # An expert's weights split over 'expert' by expert; every other weight's `embed` is
  # FSDP-split over the expert ranks too, as they hold different data.
  assert sharding.logical_to_spec(('expert', 'expert_embed', 'mlp')) == P('expert', 'fsdp',
                                                                          'tensor')
  assert sharding.logical_to_spec(('vocab', 'embed')) == P('tensor', ('fsdp', 'expert'))
  assert sharding.logical_to_spec(('embed', 'heads', 'head_dim')) == P(('fsdp', 'expert'),
                                                                       'tensor', None)
  assert sharding.logical_to_spec(None) == P()


def initial_state(config):
  """The train state of `config`, created sharded over the first 8 devices."""
  mesh = make_mesh(config, jax.devices()[:8])
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh):
    return init_state(setup)


def test_parameters_are_created_sharded_by_the_rules():
  config = tiny('--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2',
                '--config.mesh.tensor=2')
  state = initial_state(config)
  experts = state['params']['blocks'][0]['ffn']['w_up']
  assert experts.sharding.spec == P('expert', 'fsdp', 'tensor')
  # Each device holds a quarter of the experts' rows... and columns: 1/8 of the tensor.
  assert experts.addressable_shards[0].data.size * 8 == experts.size
  # Adam moments are sharded like their parameters.
  moments = jax.tree.leaves(state['opt_state'])
  assert any(m.shape == experts.shape and m.sharding.spec == experts.sharding.spec
             for m in moments)


def device_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def total_bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('axis', ['fsdp', 'expert'])
def test_fsdp_or_expert_axis_shards_parameters_and_optimizer_state_eightfold(axis):
  """Expert ranks split the experts and, as FSDP ranks, every other weight."""
  config = tiny('--config.mesh.data=1', f'--config.mesh.{axis}=8')
  state = initial_state(config)
  for part in ('params', 'opt_state'):
    share = device_bytes(state[part], jax.devices()[0]) / total_bytes(state[part])
    # Only norm scales (and the step counters) stay replicated: well under 1% of the bytes.
    assert 1 / 8 <= share < 1 / 8 * 1.02, (part, share)


def test_expert_axis_gives_each_device_one_eighth_of_the_experts():
  config = tiny('--config.mesh.data=1', '--config.mesh.expert=8')
  state = initial_state(config)
  for name in ('w_gate', 'w_up', 'w_down'):
    weights = state['params']['blocks'][0]['ffn'][name]
    assert weights.sharding.spec[0] == 'expert'
    shards = weights.addressable_shards
    assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    assert sorted(s.index[0].start for s in shards) == list(range(8))


class FakeTpu:
  """What the slice layout reads of a device: its slice and how to sort and print it."""
  platform = device_kind = 'fake'

  def __init__(self, id, slice_index):
    self.id, self.slice_index = id, slice_index

  def __repr__(self):
    return f'FakeTpu({self.id}, slice {self.slice_index})'


def test_multi_slice_mesh_puts_only_the_stage_and_data_axes_across_slices():
  # 2 slices of 8 chips, listed interleaved so that a plain reshape would mix them.
  devices = [FakeTpu(i, slice_index=i % 2) for i in range(16)]
  grid = slice_grid((1, 4, 2, 2, 1), devices)
  assert grid.shape == (1, 4, 2, 2, 1)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  # data rows 0-1 lie in slice 0 and rows 2-3 in slice 1: fsdp, expert, tensor stay inside one.
  assert (slice_of[:, :2] == 0).all() and (slice_of[:, 2:] == 1).all()
  assert sorted(d.id for d in grid.flat) == list(range(16))
  # With stages, the stages take the slices first: each stage is one slice.
  staged = np.vectorize(lambda d: d.slice_index)(slice_grid((2, 2, 2, 2, 1), devices))
  assert (staged[0] == 0).all() and (staged[1] == 1).all()
  assert slice_grid((1, 8, 1, 1, 1), devices[::2]) is None  # one slice: the plain mesh
  with pytest.raises(ConfigError, match=r'mesh.stage=1 × mesh.data=1 must span the 2 slices'):
    slice_grid((1, 1, 16, 1, 1), devices)


def test_activations_are_pinned_to_the_batch_axes_between_blocks():
  mesh = make_mesh(tiny('--config.mesh.data=2', '--config.mesh.fsdp=2',
                        '--config.mesh.expert=2', '--config.train.batch_size=8'),
                   jax.devices()[:8])
  x = np.ones((8, 4, 16), np.float32)
  assert sharding.constrain(x, None, 'batch', None, None) is x  # no mesh: nothing to pin
  y = jax.jit(lambda x: sharding.constrain(x * 2, mesh, 'batch', None, None))(x)
  assert y.sharding.spec == P(('data', 'fsdp', 'expert'))
