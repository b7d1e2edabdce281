"""FP8 dispatch (`model.moe.exchange_dtype=float8_e4m3fn`): DeepSeek-V3's per-token block
quantisation bit for bit, an expert-parallel exchange that sends quantised tokens and sends
gradients back unquantised, half the bytes on the wire, and training that follows bf16 dispatch."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import quantize
from moetrain.errors import ConfigError
from moetrain.models import pipeline
from moetrain.parallel import exchange, fp8, sharding
from moetrain.parallel.mesh import AXES
from tests.steps import first_gradients, random_batch, train

FP8 = 'float8_e4m3fn'


def reference_quantize(x):
  """numpy: blocks of 128 channels (the last may be shorter), scale = amax · float32(1/448) (1
  for a zero block), q = x / scale in float8_e4m3fn."""
  d_model = x.shape[-1]
  width = -(-d_model // 128) * 128
  padded = np.zeros(x.shape[:-1] + (width,), np.float32)
  padded[..., :d_model] = x.astype(np.float32)
  blocks = padded.reshape(*x.shape[:-1], -1, 128)
  amax = np.abs(blocks).max(-1)
  scales = np.where(amax > 0, amax * np.float32(1 / 448), np.float32(1)).astype(np.float32)
  q = np.clip(blocks / scales[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return q.reshape(*x.shape[:-1], width)[..., :d_model], scales


def reference_dequantize(q, scales, dtype):
  d_model = q.shape[-1]
  padded = np.zeros(q.shape[:-1] + (scales.shape[-1] * 128,), np.float32)
  padded[..., :d_model] = q.astype(np.float32)
  x = padded.reshape(*scales.shape, 128) * scales[..., None]
  return x.reshape(*q.shape[:-1], -1)[..., :d_model].astype(dtype)


def tokens(shape, dtype, seed=0):
  """Normal values with a spread of magnitudes per row and per block (some tiny, some past
  448), an all-zero block and a zero row."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 10.0 ** rng.integers(-6, 4, shape[:-1] + (1,))
  x[..., 128:150] *= 1e3
  x[0, :128] = 0
  x[-1] = 0
  return x.astype(dtype)


@pytest.mark.parametrize('d_model', [256, 200])  # whole blocks; a shorter last block
@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_quantisation_equals_numpy_reference_bit_for_bit(d_model, dtype):
  x = tokens((3, 5, d_model), dtype)
  ref_q, ref_scales = reference_quantize(x)
  q, scales = jax.jit(fp8.quantize)(x)
  assert q.dtype == jnp.float8_e4m3fn and scales.shape == (3, 5, 2)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  assert ref_scales[0, 0, 0] == 1 and (ref_q[0, 0, :128] == 0).all()  # the zero block

  ref_x = reference_dequantize(ref_q, ref_scales, dtype)
  np.testing.assert_array_equal(np.asarray(jax.jit(fp8.dequantize, static_argnums=2)(
      q, scales, dtype)), ref_x)
  # The round trip loses precision: e4m3's 3 mantissa bits, and its subnormals' steps of
  # scale / 512 (then bf16 rounding).
  error = np.abs(ref_x.astype(np.float32) - x.astype(np.float32))
  assert error.max() > 0
  scale_per_channel = np.repeat(ref_scales, 128, axis=-1)[..., :d_model]
  assert (error <= np.abs(x.astype(np.float32)) / 14 + scale_per_channel / 1024).all()

  # On the wire: each row's fp8 bytes, then its scales' bytes; back to the dequantised values.
  wire = np.asarray(jax.jit(fp8.to_wire)(x))
  np.testing.assert_array_equal(wire, np.concatenate(
      [ref_q.view(np.uint8), ref_scales.view(np.uint8)], axis=-1))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(fp8.from_wire, static_argnums=(1, 2))(wire, d_model, dtype)), ref_x)


def test_check_refuses_a_backend_that_cannot_quantise_in_one_line(monkeypatch):
  fp8.check('', jax.devices()[:1])
  fp8.check(FP8, jax.devices()[:8])  # XLA:CPU can
  with monkeypatch.context() as patch:
    patch.setattr(fp8, 'DTYPE', jnp.float8_e4m3fnuz)  # as if it quantised to another type
    with pytest.raises(ConfigError, match=r'^model\.moe\.exchange_dtype=float8_e4m3fn: the cpu '
                                          r'backend quantises tokens to it wrongly [^\n]*$'):
      fp8.check(FP8, jax.devices()[:1])

  def unsupported(x):
    raise NotImplementedError('no float8 on this platform\nand a long story')
  monkeypatch.setattr(fp8, 'to_wire', unsupported)
  with pytest.raises(ConfigError, match=r'^model\.moe\.exchange_dtype=float8_e4m3fn: the cpu '
                                        r'backend cannot quantise tokens to it \(no float8 on '
                                        r'this platform\)$'):
    fp8.check(FP8, jax.devices()[:1])
  with pytest.raises(ConfigError, match=r'^model\.moe\.exchange_dtype=.int8.: expected'):
    exchange.ExpertParallel(None, wire_dtype='int8')


def mesh_of(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh((1,) + shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def exchanges(mesh):
  """(FP8 dispatch, plain dispatch) on `mesh`, as the model builds them."""
  moe = config_lib.load('configs/tiny.py', [f'--config.model.moe.exchange_dtype={FP8}']).model.moe
  fp8_exchange = exchange.for_mesh(mesh, moe)
  assert fp8_exchange.wire_dtype == FP8 and exchange.for_mesh(mesh).wire_dtype == ''
  # Where the experts are not split nothing travels, and the option changes nothing.
  assert exchange.for_mesh(mesh_of((8, 1, 1, 1)), moe) is exchange.LOCAL
  return fp8_exchange, exchange.for_mesh(mesh, config_lib.load('configs/tiny.py', []).model.moe)


def on_each_device(mesh, fn, *arrays):
  """`fn` on every device's rows of `arrays` (split over the batch axes), results likewise."""
  batch = sharding.spec(mesh, 'batch')
  return jax.device_get(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=batch,
                                              out_specs=batch))(*arrays))


def dispatch_and_gradient(dispatch, x, cotangent):
  """(dispatch(x), its gradient for `cotangent`): the dispatch is linear in x, so its
  gradient does not depend on x, and the plain and FP8 gradients can be compared exactly."""
  y, vjp = jax.vjp(dispatch, x)
  return y, vjp(cotangent)[0]


def quantised(x):
  return fp8.dequantize(*fp8.quantize(x), x.dtype)


def assert_fp8_dispatch_is_quantised_then_plain_with_plain_gradients(mesh, dispatch, x, ct):
  """`dispatch(the_exchange, x)`: FP8 equals plain of the quantised tokens; gradients equal."""
  fp8_exchange, plain = exchanges(mesh)

  def compare(x, cotangent):
    y, grad = dispatch_and_gradient(lambda a: dispatch(fp8_exchange, a), x, cotangent)
    ref_y, ref_grad = dispatch_and_gradient(lambda a: dispatch(plain, a), quantised(x),
                                            cotangent)
    return y, ref_y, grad, ref_grad, dispatch(plain, x)
  y, ref_y, grad, ref_grad, unquantised_y = on_each_device(mesh, compare, x, ct)
  assert y.dtype == x.dtype and np.abs(y.astype(np.float32)).max() > 1
  np.testing.assert_array_equal(y, ref_y)
  assert not np.array_equal(y, unquantised_y)  # tokens really travelled in fp8
  assert grad.dtype == x.dtype and np.abs(grad.astype(np.float32)).max() > 0.1
  np.testing.assert_array_equal(grad, ref_grad)


@pytest.mark.parametrize('shape', [(1, 1, 4, 1), (2, 1, 4, 1), (1, 1, 8, 1)])
def test_fp8_capacity_buffers_on_expert_mesh(shape):
  mesh = mesh_of(shape)
  devices, groups, num_experts, capacity, d_model = int(np.prod(shape)), 2, 8, 3, 200
  x = tokens((devices * groups, num_experts, capacity, d_model), ml_dtypes.bfloat16)
  peers = shape[2]
  ct = tokens((devices * groups * peers, num_experts // peers, capacity, d_model),
              ml_dtypes.bfloat16, seed=1)
  assert_fp8_dispatch_is_quantised_then_plain_with_plain_gradients(
      mesh, lambda the_exchange, a: the_exchange.buffers_to_experts(a), x, ct)


@pytest.mark.parametrize('shape', [(1, 1, 4, 1), (2, 1, 4, 1)])
def test_fp8_dropless_rows_on_expert_mesh(shape):
  mesh = mesh_of(shape)
  devices, rows, num_experts, d_model = int(np.prod(shape)), 12, 8, 256
  rng = np.random.default_rng(2)
  # Each device's rows sorted by expert; the last few belong to no expert (dropped, padding).
  counts = np.stack([rng.multinomial(rng.integers(6, rows + 1), np.ones(num_experts) / num_experts)
                     for _ in range(devices)]).astype(np.int32)
  x = tokens((devices * rows, d_model), np.float32)
  ct = tokens((devices * rows * shape[2], d_model), np.float32, seed=3)

  def dispatch(the_exchange, x_MxD, counts_E):
    return the_exchange.rows_to_experts(x_MxD, counts_E)[0]
  fp8_exchange, plain = exchanges(mesh)

  def compare(x_MxD, counts_E, cotangent):
    y, grad = dispatch_and_gradient(lambda a: dispatch(fp8_exchange, a, counts_E), x_MxD,
                                    cotangent)
    ref_y, ref_grad = dispatch_and_gradient(lambda a: dispatch(plain, a, counts_E),
                                            quantised(x_MxD), cotangent)
    return y, ref_y, grad, ref_grad, dispatch(plain, x_MxD, counts_E)
  y, ref_y, grad, ref_grad, unquantised_y = on_each_device(mesh, compare, x, counts.reshape(-1),
                                                           ct)
  assert np.abs(y).max() > 1
  np.testing.assert_array_equal(y, ref_y)
  assert not np.array_equal(y, unquantised_y)
  np.testing.assert_array_equal(grad, ref_grad)
  # Every real row got its cotangent back, rows of no expert none.
  sent = np.arange(rows)[None, :] < counts.sum(1)[:, None]
  assert (np.abs(grad).reshape(devices, rows, d_model).max(-1) > 0).tolist() == sent.tolist()


def test_native_fp8_rows_lower_to_a_ragged_exchange_of_bytes():
  mesh = mesh_of((1, 1, 4, 1))
  native = exchange.ExpertParallel(mesh, native=True, wire_dtype=FP8)
  x, counts = np.zeros((4 * 12, 256), np.float32), np.ones(4 * 8, np.int32)

  def received_and_grad(x_MxD, counts_E):
    received_RxD, vjp = jax.vjp(lambda a: native.rows_to_experts(a, counts_E)[0], x_MxD)
    return received_RxD, vjp(jnp.ones_like(received_RxD))[0]
  batch = sharding.spec(mesh, 'batch')
  text = jax.jit(jax.shard_map(received_and_grad, mesh=mesh, in_specs=batch,
                               out_specs=batch)).lower(x, counts).as_text()
  exchanged = re.findall(r'@ragged_all_to_all\(.*-> tensor<(\w+)>', text)
  # Forward: 4 peers' 12 rows of 256 fp8 values and 2 float32 scales, as bytes; backward:
  # float32 rows home.
  assert sorted(exchanged) == ['12x256xf32', '48x264xui8'], exchanged


# Bytes of the element types the exchanges move, in HLO's and in StableHLO's spelling.
WIDTHS = {'u8': 1, 'ui8': 1, 'bf16': 2, 's32': 4, 'i32': 4, 'f32': 4}


def dispatched_bytes(hlo_text: str) -> int:
  """Result bytes of every all-to-all of the dispatch (named scope 'dispatch') in compiled HLO."""
  total = 0
  for line in hlo_text.splitlines():
    match = re.search(r'= (.*?) all-to-all(-start)?\(', line)
    if match and '/dispatch/' in line:
      total += sum(WIDTHS[dtype] * int(np.prod([int(n) for n in dims.split(',') if n]))
                   for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', match.group(1)))
  return total


def lowered_exchanges(stablehlo_text: str, scope: str) -> list[tuple[str, str]]:
  """(shape, element type) of every all_to_all in named scope `scope` of a lowered program
  (StableHLO with debug info): what the exchange sends, before a backend changes the types
  (XLA:CPU widens bf16 collectives to f32)."""
  scopes = dict(re.findall(r'^(#loc\d+) = loc\("([^"]*)"', stablehlo_text, re.M))
  return [(shape, dtype) for shape, dtype, loc in re.findall(
      r'"stablehlo\.all_to_all".*-> tensor<([\dx]+)x(\w+)> loc\((#loc\d+)\)', stablehlo_text)
          if scopes[loc].startswith(scope + '/')]


def total_bytes(exchanged) -> int:
  return sum(WIDTHS[dtype] * int(np.prod([int(n) for n in shape.split('x')]))
             for shape, dtype in exchanged)


def lowered_layer(mesh, the_exchange, capacity):
  """The token-choice MoE layer after routing, bf16, lowered on `mesh`."""
  groups, tokens_per_group, num_experts, d_model, d_expert, k = 8, 16, 8, 256, 64, 2
  rng = np.random.default_rng(0)
  bf16 = lambda *shape: rng.normal(size=shape).astype(ml_dtypes.bfloat16)
  experts = rng.integers(0, num_experts, (groups, tokens_per_group, k)).astype(np.int32)
  gates = np.full((groups, tokens_per_group, k), 0.5, np.float32)
  mask = np.ones((groups, tokens_per_group), np.float32)

  def layer(x, w_gate, w_up, w_down):
    return pipeline.token_choice(x, experts, gates, mask, (w_gate, w_up, w_down),
                                 num_experts=num_experts, capacity=capacity,
                                 exchange=the_exchange)[0]
  with jax.set_mesh(mesh):
    return jax.jit(layer).lower(
        bf16(groups, tokens_per_group, d_model), bf16(num_experts, d_model, d_expert),
        bf16(num_experts, d_model, d_expert), bf16(num_experts, d_expert, d_model))


@pytest.mark.parametrize('capacity', [6, None])  # capacity buffers; dropless rows
def test_fp8_dispatch_halves_the_bytes_of_bf16_dispatch(capacity):
  mesh = mesh_of((1, 1, 4, 1))
  fp8_layer, bf16_layer = (lowered_layer(mesh, e, capacity) for e in exchanges(mesh))
  fp8_text, bf16_text = (layer.as_text(debug_info=True) for layer in (fp8_layer, bf16_layer))
  fp8_bytes, bf16_bytes = (total_bytes(lowered_exchanges(text, 'dispatch'))
                           for text in (fp8_text, bf16_text))
  # 256 fp8 values and 2 float32 scales a row instead of 256 bf16 values: 264 / 512 (dropless
  # adds 32 bytes of offsets to either).
  assert 264 / 512 <= fp8_bytes / bf16_bytes < 0.525, (fp8_bytes, bf16_bytes)
  dtypes = lambda text, scope: {dtype for _, dtype in lowered_exchanges(text, scope)}
  assert 'ui8' in dtypes(fp8_text, 'dispatch') and 'bf16' in dtypes(bf16_text, 'dispatch')
  # The bytes reach the devices as they are: XLA:CPU widens bf16 (and float8) collectives.
  assert dispatched_bytes(fp8_layer.compile().as_text()) == fp8_bytes
  # The results come home in bf16 either way.
  assert lowered_exchanges(fp8_text, 'combine') == lowered_exchanges(bf16_text, 'combine')
  assert 'bf16' in dtypes(fp8_text, 'combine')


TRAIN = ['--config.model.vocab_size=64', '--config.model.d_model=128', '--config.model.d_ff=128',
         '--config.model.num_layers=2', '--config.model.max_seq_len=32',
         '--config.model.dtype=bfloat16', '--config.train.batch_size=32',
         '--config.train.seq_len=32', '--config.train.warmup_steps=10',
         '--config.train.learning_rate=3e-3', '--config.train.steps=100',
         '--config.train.sample_tokens=0', '--config.mesh.data=1', '--config.mesh.expert=4']


def noisy_batch(config, step):
  """Sequences of an affine recurrence mod V with 30% of the tokens replaced at random: the
  loss can fall a lot but not below the noise's entropy (about 1.8 nats), where 1% means
  something."""
  rng = np.random.default_rng(step)
  b, l, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
  starts = rng.integers(1, v, (b, 1))
  sequences = (starts * 7 + np.arange(l + 1)[None, :] * 5) % (v - 1) + 1
  noise = rng.random(sequences.shape) < 0.3
  sequences = np.where(noise, rng.integers(1, v, sequences.shape), sequences)
  return {'inputs': sequences[:, :-1].astype(np.int32),
          'targets': sequences[:, 1:].astype(np.int32)}


def train_losses(exchange_dtype):
  config = config_lib.load('configs/tiny.py',
                           TRAIN + [f'--config.model.moe.exchange_dtype={exchange_dtype}'])
  losses, _, _ = train(config, jax.devices()[:4], functools.partial(noisy_batch, config),
                       config.train.steps)
  return losses


def test_fp8_dispatch_trains_like_bf16_dispatch():
  # Any perturbation moves a training run's loss a little (over seeds 0-3 these two runs end
  # within 0.45% of each other; at batch size 8, within 3%): the batch is sized to keep that
  # well inside the 1% asked of FP8 dispatch.
  bf16_losses, fp8_losses = train_losses(''), train_losses(FP8)
  assert bf16_losses[-10:].mean() < 0.6 * bf16_losses[:3].mean(), bf16_losses  # it learns
  assert not np.array_equal(fp8_losses, bf16_losses)  # and FP8 dispatch changes something
  np.testing.assert_allclose(fp8_losses[-10:].mean(), bf16_losses[-10:].mean(), rtol=0.01)


MIXED = ['--config.model.vocab_size=64', '--config.model.d_model=128', '--config.model.d_ff=48',
         '--config.model.num_layers=2', '--config.model.max_seq_len=16',
         '--config.train.batch_size=16', '--config.train.seq_len=16',
         '--config.train.sample_tokens=0', '--config.mesh.data=1', '--config.mesh.fsdp=2',
         '--config.mesh.expert=2', '--config.mesh.tensor=2', '--config.model.moe.exchange_chunks=2']


@pytest.mark.parametrize('capacity_factor', ['0'])  # capacity buffers: exact tests above
def test_fp8_step_on_fsdp_expert_tensor_mesh_is_near_bf16_dispatch(capacity_factor):
  """The whole step, in chunks, with every mesh axis split: FP8 dispatch moves the loss and
  gradients by its rounding alone."""
  steps = []
  for exchange_dtype in ('', FP8):
    config = config_lib.load('configs/tiny.py', MIXED + [
        f'--config.model.moe.capacity_factor={capacity_factor}',
        f'--config.model.moe.exchange_dtype={exchange_dtype}'])
    steps.append(first_gradients(config, jax.devices()[:8], random_batch(config))[0])
  (grads, metrics, _), (fp8_grads, fp8_metrics, _) = steps
  np.testing.assert_allclose(fp8_metrics['loss'], metrics['loss'], rtol=1e-4)
  deviation = jax.tree.map(lambda a, b: np.linalg.norm(b - a) / np.linalg.norm(a), grads,
                           fp8_grads)
  # e4m3 keeps 3 mantissa bits: a relative rounding error of up to 1/16 (3.6% RMS), which
  # the gradients of the expert weights see directly (3.5-6% here), the rest far less.
  assert 0 < max(jax.tree.leaves(deviation)) < 0.1, deviation


def expert_blocks(d_model, d_expert, num_experts=4):
  """(w_gate, w_up, w_down) of `num_experts` experts, float32, magnitudes spread per expert."""
  scales = 10.0 ** np.arange(num_experts)[:, None, None]
  return tuple((tokens(shape, np.float32, seed) * scales).astype(np.float32)
               for seed, shape in enumerate([(num_experts, d_model, d_expert)] * 2 +
                                            [(num_experts, d_expert, d_model)]))


@pytest.mark.parametrize('recipe', ['tensorwise', 'blockwise'])
def test_fp8_expert_weights_gather_as_bytes_and_equal_the_gathered_weights_quantised(recipe):
  """Under `model.fp8` each expert block is quantised before its FSDP gather and gathered at one
  byte a value: the gathered (q, scales) are those of the gathered weight, bit for bit."""
  mesh = mesh_of((1, 2, 2, 1))  # fsdp=2, expert=2: two experts and half the model dim a device
  parallel = exchange.ExpertParallel(mesh)
  weights_in = sharding.manual_spec(mesh, *sharding.EXPERT_IN_AXES)
  weights_out = sharding.manual_spec(mesh, *sharding.EXPERT_OUT_AXES)
  gathered = jax.shard_map(lambda *w: parallel.quantized_expert_weights(recipe, *w), mesh=mesh,
                           in_specs=(weights_in, weights_in, weights_out),
                           out_specs=jax.sharding.PartitionSpec('expert'),
                           check_vma=False)  # all_gather's result is typed as varying
  weights = expert_blocks(256, 136)  # whole 128-blocks on each fsdp rank; a partial block of F
  lowered = jax.jit(gathered).lower(*weights)
  blocks = quantize.RECIPES[recipe].tile_blocks(3)
  quantised = jax.jit(quantize.quantize, static_argnums=1)
  for (q, scales), w in zip(jax.device_get(lowered.compile()(*weights)), weights):
    # Each expert rank's two experts, as its matmuls see them: tiles of each, or one scale.
    ref_q, ref_scales = (np.concatenate(parts) for parts in zip(*jax.device_get(
        [quantised(w[rank:rank + 2], blocks) for rank in (0, 2)])))
    np.testing.assert_array_equal(q.view(np.uint8), ref_q.view(np.uint8))
    np.testing.assert_array_equal(scales, ref_scales)
  gathers = re.findall(r'"stablehlo\.all_gather".*-> tensor<[\dx]+x(\w+)>', lowered.as_text())
  assert set(gathers) == ({'ui8', 'f32'} if recipe == 'blockwise' else {'ui8'}), gathers
  # Blocks would straddle the ranks' halves of a 128-wide model dim: the masters are gathered.
  straddling = jax.eval_shape(gathered, *expert_blocks(128, 136))
  assert (straddling == (None,) * 3) == (recipe == 'blockwise'), straddling


def test_fp8_experts_on_an_fsdp_expert_mesh_equal_one_device():
  """Blockwise FP8 experts with their weights gathered in FP8: the layer's output and weight
  gradients are the single device's (DeepSeek-V3's blocks never depend on the mesh)."""
  groups, tokens_per_group, num_experts, k = 8, 8, 4, 2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(groups, tokens_per_group, 256)).astype(np.float32)
  experts = rng.integers(0, num_experts, (groups, tokens_per_group, k)).astype(np.int32)
  gates = np.full((groups, tokens_per_group, k), 0.5, np.float32)
  mask = np.ones((groups, tokens_per_group), np.float32)

  def loss_and_grads(the_exchange, mesh, weights):
    def loss(weights):
      y = pipeline.token_choice(x, experts, gates, mask, weights, num_experts=num_experts,
                                capacity=6, exchange=the_exchange, fp8='blockwise')[0]
      return jnp.sum(y * y)
    with jax.set_mesh(mesh):
      return jax.device_get(jax.jit(jax.value_and_grad(loss))(weights))
  mesh = mesh_of((1, 2, 2, 1))
  weights = tuple((rng.normal(size=w.shape) * 0.05).astype(np.float32)
                  for w in expert_blocks(256, 136))
  (loss, grads), (ref_loss, ref_grads) = (
      loss_and_grads(exchange.for_mesh(mesh), mesh, weights),
      loss_and_grads(exchange.LOCAL, mesh_of((1, 1, 1, 1)), weights))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    assert grad.dtype == np.float32 and np.abs(ref).max() > 0
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
