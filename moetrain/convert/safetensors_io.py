"""Hugging Face checkpoint folders, read and written one tensor at a time with `safetensors`.

A folder holds `config.json` and `model.safetensors` or the shards `model.safetensors.index.json`
lists. `Reader` opens shards on demand, keeping a few open; `write_checkpoint` streams tensors
into bounded shards and moves the folder into place only once complete. Pickle checkpoints
(`pytorch_model.bin`, `*.pt`) are refused: loading them can run arbitrary code.
"""

import collections
import json
import pathlib
import shutil
import struct

import ml_dtypes  # registers bfloat16 with numpy; safetensors' numpy reader looks it up there
import numpy as np
import safetensors
from safetensors.numpy import save_file

from moetrain import checkpoint
from moetrain.errors import ConfigError

BLOCK_SIZE = 128  # DeepSeek-V3's FP8 weights: one scale per 128×128 block (weight_block_size)
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'
SCALE_SUFFIX = '_scale_inv'  # `x.weight` is scaled by `x.weight_scale_inv`
METADATA = {'format': 'pt'}  # transformers refuses safetensors files without it
_PICKLES = ('pytorch_model*.bin', 'pytorch_model.bin.index.json', '*.pt', '*.pth')
# safetensors' numpy reader looks these up on the numpy module, which lacks them (safetensors
# issue #682), so their bytes are read directly and viewed as the ml_dtypes type.
_RAW_DTYPES = {'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}
_READ_ERRORS = (safetensors.SafetensorError, OSError, ValueError, TypeError, AttributeError)


class ConversionError(ConfigError):
  """An unusable checkpoint folder, file or tensor; the one-line message names it."""


def _reason(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _no_safetensors(folder: pathlib.Path) -> ConversionError:
  pickles = sorted({path.name for pattern in _PICKLES for path in folder.glob(pattern)})
  if pickles:
    return ConversionError(
        f'{folder} holds only pickle checkpoints ({", ".join(pickles)}); safetensors is required '
        '(pickle checkpoints are refused because loading them can run arbitrary code)')
  return ConversionError(f'{folder} holds neither {SINGLE} nor {INDEX}')


def _weight_map(index: pathlib.Path) -> dict:
  """{tensor name: shard path} from a sharded checkpoint's index, every shard present."""
  try:
    weight_map = json.loads(index.read_text()).get('weight_map')
  except (OSError, ValueError, AttributeError) as error:
    raise ConversionError(f'{index} is not a readable index ({_reason(error)})') from None
  if not isinstance(weight_map, dict):
    raise ConversionError(f'{index} has no weight_map')
  paths = {name: index.parent / shard for name, shard in weight_map.items()}
  missing = sorted({str(path) for path in paths.values() if not path.is_file()})
  if missing:
    raise ConversionError(f'shard {missing[0]} listed in {index} is missing')
  return paths


def _read_raw(path: pathlib.Path, name: str, dtype) -> np.ndarray:
  # The header is a little-endian u64 length then JSON; safe_open has already validated it.
  with open(path, 'rb') as file:
    (length,) = struct.unpack('<Q', file.read(8))
    entry = json.loads(file.read(length))[name]
  begin, end = entry['data_offsets']
  data = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=8 + length + begin)
  return data.view(dtype).reshape(entry['shape'])


def block_sizes(ndim: int, block_size=BLOCK_SIZE) -> tuple:
  """Per-axis block sizes from one size or a list such as `weight_block_size: [128, 128]`."""
  return (int(block_size),) * ndim if np.isscalar(block_size) else tuple(map(int, block_size))


def dequantize(weight: np.ndarray, scale: np.ndarray, block_size=BLOCK_SIZE) -> np.ndarray:
  """float32(weight) times the scale of its block, as bfloat16 (the last blocks may be partial)."""
  full = scale.astype(np.float32)
  for axis, size in enumerate(block_sizes(weight.ndim, block_size)):
    full = np.repeat(full, size, axis=axis)
  product = weight.astype(np.float32)
  product *= full[tuple(slice(0, length) for length in weight.shape)]
  return product.astype(ml_dtypes.bfloat16)


class Reader:
  """A checkpoint folder's tensors, loaded one at a time; at most `max_open` shards stay open."""

  def __init__(self, folder, max_open: int = 4):
    self.folder = pathlib.Path(folder)
    self.max_open = max_open
    self._open = collections.OrderedDict()  # shard path -> safe_open handle, oldest use first
    if not self.folder.is_dir():
      raise ConversionError(f'checkpoint folder {self.folder} does not exist')
    single, index = self.folder / SINGLE, self.folder / INDEX
    if single.is_file():
      self._where = dict.fromkeys(self._handle(single).keys(), single)
    elif index.is_file():
      self._where = _weight_map(index)
    else:
      raise _no_safetensors(self.folder)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._close(0)

  def _close(self, keep: int) -> None:
    while len(self._open) > keep:  # least recently used first
      self._open.popitem(last=False)[1].__exit__(None, None, None)

  def _handle(self, path: pathlib.Path):
    handle = self._open.pop(path, None)
    if handle is None:
      try:
        handle = safetensors.safe_open(str(path), framework='numpy')
      except (safetensors.SafetensorError, OSError) as error:
        raise ConversionError(
            f'{path} is not a readable safetensors file ({_reason(error)})') from None
      self._close(self.max_open - 1)
    self._open[path] = handle
    return handle

  def _path(self, name: str) -> pathlib.Path:
    if name not in self._where:
      raise ConversionError(f'tensor {name} is not in the checkpoint {self.folder}')
    return self._where[name]

  def _slice(self, name: str):
    path = self._path(name)
    try:
      return self._handle(path).get_slice(name)
    except safetensors.SafetensorError as error:
      raise ConversionError(f'tensor {name} is not in {path} ({_reason(error)})') from None

  def names(self) -> list[str]:
    """Every tensor name, sorted."""
    return sorted(self._where)

  def shape(self, name: str) -> tuple:
    """The shape of `name`, read from the file header alone."""
    return tuple(self._slice(name).get_shape())

  def dtype_name(self, name: str) -> str:
    """The safetensors dtype of `name` ('BF16', 'F32', 'F8_E4M3', ...), from the header alone."""
    return self._slice(name).get_dtype()

  def get(self, name: str) -> np.ndarray:
    """`name` as a numpy array, bit-exact (bfloat16 and float8 as ml_dtypes types)."""
    dtype, path = self.dtype_name(name), self._path(name)
    try:
      if dtype in _RAW_DTYPES:
        return _read_raw(path, name, _RAW_DTYPES[dtype])
      return self._handle(path).get_tensor(name)
    except _READ_ERRORS as error:
      raise ConversionError(
          f'tensor {name} ({dtype}) in {path} cannot be read ({_reason(error)})') from None

  def get_dequantized(self, name: str, block_size=BLOCK_SIZE) -> np.ndarray:
    """`name`, as bfloat16 if an FP8 weight with block-wise `weight_scale_inv` (DeepSeek-V3)."""
    scale_name = name + SCALE_SUFFIX
    if (not name.endswith('.weight') or scale_name not in self._where
        or self.dtype_name(name) != 'F8_E4M3'):
      return self.get(name)
    shape, scale_shape = self.shape(name), self.shape(scale_name)
    sizes = block_sizes(len(shape), block_size)
    wanted = tuple(-(-length // size) for length, size in zip(shape, sizes))
    if len(sizes) != len(shape) or scale_shape != wanted:
      raise ConversionError(f'scale {scale_name} has shape {scale_shape}, but {name} of shape'
                            f' {shape} in blocks of {sizes} needs {wanted}')
    return dequantize(self.get(name), self.get(scale_name), sizes)

  @staticmethod
  def is_auxiliary(name: str) -> bool:
    """True for tensors that qualify others (FP8 scales) rather than being model weights."""
    return name.endswith('.weight' + SCALE_SUFFIX)

  def config(self) -> dict:
    """The folder's parsed config.json."""
    path = self.folder / CONFIG
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      raise ConversionError(f'{path} is missing') from None
    except (OSError, ValueError) as error:
      raise ConversionError(f'{path} is not valid JSON ({_reason(error)})') from None


def _shards(tensors, max_shard_bytes: int):
  """Groups `(name, array)` pairs into dicts of at most `max_shard_bytes` (or one tensor)."""
  shard, size, seen = {}, 0, set()
  for name, array in tensors:
    if name in seen:
      raise ConversionError(f'tensor {name} is written twice')
    seen.add(name)
    array = np.ascontiguousarray(array)  # save_file copies the raw buffer, ignoring strides
    if shard and size + array.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[name] = array
    size += array.nbytes
  if shard:
    yield shard


def _write_shards(staging: pathlib.Path, tensors, max_shard_bytes: int, progress) -> tuple:
  """Shards under provisional names: ([path], {tensor name: shard number}, total bytes)."""
  paths, numbers, total = [], {}, 0
  for shard in _shards(tensors, max_shard_bytes):
    path = staging / f'shard-{len(paths):05d}.partial'
    try:
      save_file(shard, str(path), metadata=METADATA)
    except (safetensors.SafetensorError, ValueError, TypeError) as error:
      raise ConversionError(f'cannot write tensors {", ".join(shard)[:200]} to safetensors'
                            f' ({_reason(error)})') from None
    paths.append(path)
    for name, array in shard.items():
      numbers[name], total = len(paths) - 1, total + array.nbytes
      if progress is not None:
        progress(name)
  return paths, numbers, total


def write_checkpoint(folder, tensors, config_dict: dict, max_shard_bytes: int = 5 * 2**30,
                     progress=None) -> None:
  """Writes lazily produced `(name, array)` pairs and `config_dict` as a Hugging Face folder.

  Shards hold at most `max_shard_bytes` (or one larger tensor); `progress(name)` runs once each
  tensor is written. The folder appears only when complete; a non-empty one is refused.
  """
  folder = pathlib.Path(folder)
  staging = checkpoint.staging_for(folder)
  try:
    paths, numbers, total = _write_shards(staging, tensors, max_shard_bytes, progress)
    if not paths:
      raise ConversionError(f'no tensors to write to {folder}')
    names = [SINGLE] if len(paths) == 1 else [
        f'model-{i + 1:05d}-of-{len(paths):05d}.safetensors' for i in range(len(paths))]
    for path, name in zip(paths, names):
      path.rename(staging / name)
    if len(paths) > 1:
      index = {'metadata': {'total_size': total},
               'weight_map': {name: names[number] for name, number in sorted(numbers.items())}}
      (staging / INDEX).write_text(json.dumps(index, indent=2) + '\n')
    (staging / CONFIG).write_text(json.dumps(config_dict, indent=2) + '\n')
    checkpoint.move_into_place(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
