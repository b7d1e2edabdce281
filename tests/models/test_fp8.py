"""FP8 matmuls (`model.fp8`): the product of the quantised operands forward, dgrad and wgrad on
quantised operands backward (checked against numpy formulas for an einsum, the batched expert
matmul and the grouped matmul), float32 gradients for float32 master weights, training that
follows bf16, and one line for an unknown recipe."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import train
from moetrain.models import fp8, grouped_matmul
from tests.parallel.test_fp8_exchange import noisy_batch
from tests.steps import first_gradients, random_batch
from tests.steps import train as train_steps
from tests.test_quantize import reference_dequantize, reference_quantize

# recipe -> (block rows, block columns) of (activations and gradients [M, K], weights [K, N]),
# None taking the whole axis; the gradients' float8 type.
RECIPES = {'tensorwise': (((None, None), (None, None)), 'e5m2'),
           'blockwise': (((1, 128), (128, 128)), 'e4m3')}


def qdq(a, rows, cols, float8='e4m3'):
  """numpy quantise-dequantise of a [..., K, N] in blocks (None: the whole axis)."""
  rows, cols = rows or a.shape[-2], cols or a.shape[-1]
  return reference_dequantize(*reference_quantize(a, rows, cols, float8), rows, cols)


def reference(recipe, x, w, dy, contract, batch, product):
  """(y, dx, dw) of `product` (numpy, float64) on the quantised x [..., K...], w [batch...,
  K..., N...] and dy [..., N...]: y = x·w, dx = dy·wᵀ, dw = xᵀ·dy, every operand quantised."""
  (act, tile), gradient = RECIPES[recipe]
  k = int(np.prod(w.shape[batch:batch + contract]))
  x_q = qdq(x.reshape(-1, k), *act).reshape(x.shape).astype(np.float64)
  # Blockwise tiles each matrix of a stack; tensorwise scales the stack as one tensor.
  matrices = w.reshape(*w.shape[:batch], k, -1) if tile[0] else w.reshape(1, -1)
  w_q = qdq(matrices, *tile).reshape(w.shape).astype(np.float64)
  n = dy.shape[-1] if contract == 2 else int(np.prod(w.shape[batch + contract:]))
  dy_q = qdq(dy.reshape(-1, n), *act, gradient).reshape(dy.shape).astype(np.float64)
  return product(x_q, w_q, dy_q)


def einsum_grads(x, w, dy):
  return (np.einsum('blnh,nhd->bld', x, w), np.einsum('bld,nhd->blnh', dy, w),
          np.einsum('blnh,bld->nhd', x, dy))


def batched_grads(x, w, dy):
  return x @ w, dy @ w.transpose(0, 2, 1), x.transpose(0, 2, 1) @ dy


def grouped_grads(sizes, x, w, dy):
  """Row group e (sizes[e] rows, in order) times w[e]; rows past the groups give zero."""
  y, dx, dw = np.zeros(dy.shape), np.zeros(x.shape), np.zeros(w.shape)
  for e, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
    rows = slice(start, start + size)
    y[rows], dx[rows], dw[e] = x[rows] @ w[e], dy[rows] @ w[e].T, x[rows].T @ dy[rows]
  return y, dx, dw


SIZES = np.array([2, 0, 4], np.int32)
grouped = lambda recipe: fp8.matmul(recipe, grouped_matmul.ragged_dot, jnp.asarray(SIZES))
# product -> (x, w, dy shapes, contracted axes, batch axes of w, the FP8 product, numpy's):
# K = 200 and N = 130 or 140 end in partial blocks.
PRODUCTS = {
    'einsum': ((2, 3, 2, 100), (2, 100, 130), (2, 3, 130), 2, 0,
               lambda recipe: functools.partial(fp8.einsum, recipe, 'blnh,nhd->bld'),
               einsum_grads),
    'batched experts': ((2, 5, 200), (2, 200, 130), (2, 5, 130), 1, 1, fp8.matmul,
                        batched_grads),
    'grouped matmul': ((7, 200), (3, 200, 140), (7, 140), 1, 1, grouped,
                       functools.partial(grouped_grads, SIZES)),
}


def normal(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale * 10.0 ** rng.integers(-1, 2, shape[-1])).astype(
      np.float32)


@pytest.mark.parametrize('recipe', RECIPES)
@pytest.mark.parametrize('product', PRODUCTS)
def test_fp8_product_and_gradients_are_those_of_the_quantised_operands(product, recipe):
  x_shape, w_shape, dy_shape, contract, batch, fp8_product, numpy_product = PRODUCTS[product]
  x, w, dy = normal(x_shape, 0), normal(w_shape, 1, 0.05), normal(dy_shape, 2)
  if product == 'grouped matmul':
    dy[SIZES.sum():] = 0  # rows of no group get no cotangent

  def forward_and_back(x, w, dy):
    y, vjp = jax.vjp(fp8_product(recipe), x, w)
    return (y, *vjp(dy))
  y, dx, dw = jax.jit(forward_and_back)(x, w, dy)
  ref = reference(recipe, x, w, dy, contract, batch, numpy_product)
  for name, got, want in zip(('y', 'dx', 'dw'), (y, dx, dw), ref):
    assert got.dtype == jnp.float32, name
    # float32 accumulation against numpy's float64 of the same quantised operands.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(),
                               err_msg=name)
  plain = numpy_product(x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64))
  for got, unquantised in zip((y, dx, dw), plain):  # and the quantisation did something
    assert not np.allclose(got, unquantised, rtol=1e-3, atol=1e-3 * np.abs(unquantised).max())


SMALL = ['--config.model.vocab_size=64', '--config.model.d_model=128', '--config.model.d_ff=128',
         '--config.model.num_layers=2', '--config.model.num_heads=2',
         '--config.model.num_kv_heads=2', '--config.model.max_seq_len=32',
         '--config.model.dtype=bfloat16', '--config.train.batch_size=8',
         '--config.train.seq_len=32', '--config.train.warmup_steps=5',
         '--config.train.learning_rate=3e-3', '--config.train.steps=40',
         '--config.train.sample_tokens=0', '--config.mesh.data=1',
         '--config.model.moe.num_shared_experts=1']


def small_config(recipe, *flags):
  return config_lib.load('configs/tiny.py', SMALL + [f'--config.model.fp8={recipe}', *flags])


def test_float32_master_weights_get_float32_gradients():
  """bf16 activations, float32 parameters: every weight of the FP8 matmuls (attention, shared
  and routed experts) and everything else gets a nonzero float32 gradient."""
  config = small_config('blockwise', '--config.model.num_layers=1')
  assert config.model.param_dtype == 'float32'
  grads = first_gradients(config, jax.devices()[:1], random_batch(config))[0][0]
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) > 10
  for path, grad in leaves:
    assert grad.dtype == np.float32, path
    assert np.abs(grad).max() > 0, path


@pytest.fixture(scope='module')
def losses():
  """40 steps of a small MoE (shared expert included) with each recipe: same data, same init."""
  return {recipe: train_steps(small_config(recipe), jax.devices()[:1],
                              functools.partial(noisy_batch, small_config(recipe)), 40)[0]
          for recipe in fp8.RECIPES}


@pytest.mark.parametrize('recipe', ['tensorwise', 'blockwise'])
def test_fp8_training_follows_bf16(losses, recipe):
  reference, curve = losses['none'], losses[recipe]
  assert curve[-5:].mean() < 0.8 * curve[:3].mean(), curve  # it learns
  assert not np.array_equal(curve, reference)  # and FP8 changed the numbers
  # Early on FP8 moves the loss by its rounding alone; later the runs drift apart as any two
  # perturbed runs do, which 256 tokens a step make noisy: the last steps are compared on average.
  np.testing.assert_allclose(curve[:5], reference[:5], rtol=0.005)
  np.testing.assert_allclose(curve[-10:].mean(), reference[-10:].mean(), rtol=0.015)


def test_unknown_recipe_is_one_line_and_exit_2(tmp_path, capsys):
  workdir = tmp_path / 'w'
  assert train.main(['--config', 'configs/tiny.py', '--workdir', str(workdir),
                     '--config.model.fp8=int8']) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == ["moetrain: error: model.fp8='int8' must be one of none, tensorwise, "
                   'blockwise'], lines
  assert not workdir.exists()

