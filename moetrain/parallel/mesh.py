"""The device mesh `(stage, data, fsdp, expert, tensor)` built from `config.mesh`."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from moetrain.errors import ConfigError
from moetrain.parallel import fp8

AXES = ('stage', 'data', 'fsdp', 'expert', 'tensor')
# Expert-parallel ranks hold different data too, as in GShard and Switch.
BATCH_AXES = ('data', 'fsdp', 'expert')


def stages(mesh) -> int:
  """The pipeline stages of `mesh` (1 without a mesh or without a 'stage' axis)."""
  return 1 if mesh is None else mesh.shape.get('stage', 1)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of `AXES` (one may be -1) for `num_devices`; ConfigError otherwise."""
  sizes = [mesh_config[axis] for axis in AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f'mesh: the fixed axes ({_describe(mesh_config)}) use {fixed} devices, '
                        f'which does not divide the {num_devices} available')
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f'mesh: {_describe(mesh_config)} needs {fixed} devices, '
                      f'but {num_devices} are available')
  return tuple(sizes)


def _describe(mesh_config):
  return ' '.join(f'{axis}={mesh_config[axis]}' for axis in AXES)


def check_layout(config, shape: tuple[int, ...]) -> None:
  """Checks that the batch and the model divide over the mesh axes that split them."""
  sizes = dict(zip(AXES, shape))
  batch_shards = math.prod(sizes[axis] for axis in BATCH_AXES)
  groups = config.train.batch_size // config.model.moe.group_size
  if groups % batch_shards:
    raise ConfigError(
        f'train.batch_size={config.train.batch_size} (in dispatch groups of '
        f'model.moe.group_size={config.model.moe.group_size}) must divide evenly over '
        f'mesh data×fsdp×expert={batch_shards} devices')
  microbatches = config.train.get('microbatches', 1)
  if groups % (microbatches * batch_shards):
    raise ConfigError(
        f'each of train.microbatches={microbatches} microbatches of '
        f'train.batch_size={config.train.batch_size} (in dispatch groups of '
        f'model.moe.group_size={config.model.moe.group_size}) must divide evenly over '
        f'mesh data×fsdp×expert={batch_shards} devices')
  chunks = config.model.moe.exchange_chunks
  if chunks and groups // (microbatches * batch_shards) % chunks:  # 0: chosen later
    raise ConfigError(
        f'model.moe.exchange_chunks={chunks} must divide the '
        f'{groups // (microbatches * batch_shards)} dispatch groups each device holds per '
        'microbatch (train.batch_size / model.moe.group_size / train.microbatches / '
        'mesh data×fsdp×expert)')
  nodes = config.model.moe.exchange_nodes
  if nodes and sizes['expert'] % nodes:
    raise ConfigError(f'model.moe.exchange_nodes={nodes} must divide mesh.expert='
                      f'{sizes["expert"]}')
  experts = config.model.moe.num_experts
  if experts and experts % sizes['expert']:
    raise ConfigError(f'model.moe.num_experts={experts} must be divisible by '
                      f'mesh.expert={sizes["expert"]}')
  if not experts and sizes['expert'] > 1:
    raise ConfigError(f'mesh.expert={sizes["expert"]} needs model.moe.num_experts > 0')
  for field in ('num_heads', 'num_kv_heads'):
    if config.model[field] % sizes['tensor']:
      raise ConfigError(f'model.{field}={config.model[field]} must be divisible by '
                        f'mesh.tensor={sizes["tensor"]}')


def slice_grid(shape: tuple[int, ...], devices) -> np.ndarray | None:
  """Devices of a multi-slice TPU pod arranged as `shape`, the outer axes across slices.

  Only pipeline stages and data parallelism cross the slow links between slices (stages
  first: they send one microbatch's activations per step and stage); every other axis stays
  inside a slice. None when the devices form a single slice.
  """
  num_slices = len({getattr(device, 'slice_index', 0) for device in devices})
  if num_slices == 1:
    return None
  stage_slices = math.gcd(shape[0], num_slices)
  data_slices = num_slices // stage_slices
  if shape[1] % data_slices:
    raise ConfigError(f'mesh.stage={shape[0]} × mesh.data={shape[1]} must span the '
                      f'{num_slices} slices the devices form (only those axes cross slices)')
  dcn = (stage_slices, data_slices) + (1,) * (len(shape) - 2)
  per_slice = tuple(size // split for size, split in zip(shape, dcn))
  return mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)


def make_mesh(config, devices=None) -> Mesh:
  """Builds the mesh for `config` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config.mesh, len(devices))
  check_layout(config, shape)
  if dict(zip(AXES, shape))['expert'] > 1:
    fp8.check(config.model.moe.exchange_dtype, devices)
  axis_types = (AxisType.Auto,) * len(AXES)
  grid = slice_grid(shape, devices)
  if grid is None:
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  return Mesh(grid, AXES, axis_types=axis_types)
