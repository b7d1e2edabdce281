"""Dropless expert parallelism: ragged exchanges send each expert owner exactly its rows, the
CPU emulation behaves as `jax.lax.ragged_all_to_all` is documented to, and the expert-parallel
dropless layer gives the single-device values and gradients on meshes that split the experts."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moetrain.models import pipeline
from moetrain.parallel import exchange
from moetrain.parallel import ragged_exchange as rx

AUTO4 = (jax.sharding.AxisType.Auto,) * 4


def documented_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets,
                                 recv_sizes):
  """The pseudocode of `jax.lax.ragged_all_to_all`'s docstring, one list entry per device."""
  peers, num_slices = len(operands), len(input_offsets[0])
  per_peer = num_slices // peers
  results = [np.array(out, copy=True) for out in outputs]
  for src in range(peers):
    for i in range(num_slices):
      dst = i // per_peer
      # The receiver files this slice after the slices of earlier senders.
      slot = src * per_peer + i % per_peer
      size = send_sizes[src][i]
      assert recv_sizes[dst][slot] == size, 'send and receive sizes must agree'
      start = output_offsets[src][i]  # in the receiver's output
      results[dst][start:start + size] = operands[src][input_offsets[src][i]:][:size]
  return results


def run_on_peers(exchange, *arrays):
  """`exchange(*per-device arrays, 'x')` on 4 devices; arrays stacked along a leading axis."""
  mesh = jax.make_mesh((4,), ('x',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  local = lambda *a: jax.tree.map(lambda r: r[None], exchange(*(b[0] for b in a), 'x'))
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('x'), out_specs=P('x')))(*arrays)


# Four devices, two slices to each peer (slice i goes to device i // 2). Operand rows name their
# sender: device d holds [10d+1, ..., 10d+4]. Every output starts as -1.
HAND_EXAMPLE = dict(
    operand=[[1, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]],
    input_offsets=[[0, 0, 1, 3, 0, 0, 0, 0], [0, 3, 2, 0, 0, 0, 1, 0],
                   [0, 0, 0, 0, 1, 0, 0, 3], [0, 2, 0, 0, 0, 0, 0, 1]],
    send_sizes=[[1, 0, 2, 1, 0, 2, 0, 0], [2, 1, 1, 0, 0, 0, 3, 0],
                [0, 0, 0, 1, 2, 0, 0, 1], [0, 2, 0, 0, 1, 0, 1, 1]],
    # Where each sent slice lands in its receiver's output.
    output_offsets=[[0, 0, 0, 4, 0, 3, 0, 0], [1, 5, 2, 0, 0, 0, 0, 0],
                    [0, 0, 0, 5, 0, 0, 0, 3], [0, 3, 0, 0, 5, 0, 4, 5]],
    # Entry 2s + r: the size of sender s's r-th slice to this device.
    recv_sizes=[[1, 0, 2, 1, 0, 0, 0, 2], [2, 1, 1, 0, 0, 1, 0, 0],
                [0, 2, 0, 0, 2, 0, 1, 0], [0, 0, 3, 0, 0, 1, 1, 1]],
)
HAND_EXPECTED = [
    [1, 11, 12, 33, 34, 14],  # 1 from itself, 11 12 and 14 from device 1, 33 34 from device 3
    [2, 3, 13, -1, 4, 21],  # row 3 is written by nobody and keeps the output's -1
    [22, 23, -1, 1, 2, 31],
    [12, 13, 14, 24, 31, 32],
]


def test_emulation_follows_the_documented_semantics_on_a_hand_checked_example():
  arrays = {name: np.array(value, np.int32) for name, value in HAND_EXAMPLE.items()}
  output = np.full((4, 6), -1, np.int32)
  np.testing.assert_array_equal(
      documented_ragged_all_to_all(arrays['operand'], output, arrays['input_offsets'],
                                   arrays['send_sizes'], arrays['output_offsets'],
                                   arrays['recv_sizes']), HAND_EXPECTED)
  result = run_on_peers(rx.emulated_ragged_all_to_all, arrays['operand'], output,
                        arrays['input_offsets'], arrays['send_sizes'], arrays['output_offsets'],
                        arrays['recv_sizes'])
  np.testing.assert_array_equal(result, HAND_EXPECTED)


def random_exchange(rng, peers=4, per_peer=2, operand_rows=6, output_rows=24):
  """Random consistent sizes and offsets: slices may overlap in the operand, never in outputs."""
  sizes = rng.integers(0, 3, (peers, peers, per_peer))  # [src, dst, r]
  input_offsets = rng.integers(0, operand_rows - sizes + 1)
  output_offsets = np.zeros_like(sizes)
  for dst in range(peers):
    # Incoming slices in a random order, with random gaps between them.
    position = 0
    for src, r in rng.permutation([(s, r) for s in range(peers) for r in range(per_peer)]):
      position += rng.integers(0, 2)
      output_offsets[src, dst, r] = position
      position += sizes[src, dst, r]
    assert position <= output_rows
  flat = lambda a: a.reshape(peers, peers * per_peer).astype(np.int32)
  recv_sizes = flat(sizes.transpose(1, 0, 2))
  return flat(input_offsets), flat(sizes), flat(output_offsets), recv_sizes


def test_emulation_values_and_gradients_follow_the_documented_semantics():
  rng = np.random.default_rng(0)
  input_offsets, send_sizes, output_offsets, recv_sizes = random_exchange(rng)
  operand = rng.normal(size=(4, 6, 3)).astype(np.float32)
  output = rng.normal(size=(4, 24, 3)).astype(np.float32)
  cotangent = rng.normal(size=output.shape).astype(np.float32)
  expected = documented_ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                          output_offsets, recv_sizes)
  # The adjoint of the documented pseudocode: every sent row receives the cotangent of the row
  # it was written to; output rows that got overwritten pass no gradient.
  rows = np.arange(6, dtype=np.float32)[None, :, None] * np.ones_like(operand)
  landed = documented_ragged_all_to_all(rows + 100 * np.arange(4)[:, None, None],
                                        np.full_like(output, -1), input_offsets, send_sizes,
                                        output_offsets, recv_sizes)
  expected_d_operand = np.zeros_like(operand)
  for dst in range(4):
    for position in range(24):
      source = int(landed[dst][position, 0])
      if source >= 0:
        expected_d_operand[source // 100, source % 100] += cotangent[dst, position]
  expected_d_output = np.where(np.stack(landed) < 0, cotangent, 0)

  def exchange_and_vjp(operand, output, *offsets_and_sizes_and_cotangent):
    *offsets_and_sizes, cotangent, axis_name = offsets_and_sizes_and_cotangent
    result, vjp = jax.vjp(lambda a, b: rx.emulated_ragged_all_to_all(a, b, *offsets_and_sizes,
                                                                     axis_name), operand, output)
    return (result, *vjp(cotangent))

  result, d_operand, d_output = run_on_peers(exchange_and_vjp, operand, output, input_offsets,
                                             send_sizes, output_offsets, recv_sizes, cotangent)
  np.testing.assert_array_equal(result, np.stack(expected))
  np.testing.assert_allclose(d_operand, expected_d_operand, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(d_output, expected_d_output)


# ---------------------------------------------------------------------------------------------
# The dropless expert-parallel layer.

NUM_EXPERTS, D_MODEL, D_EXPERT, GROUPS, TOKENS, TOP_K = 8, 16, 32, 8, 8, 2
HOT_EXPERT, COLD_EXPERT = 3, 5


def skewed_problem():
  """Inputs where expert 3 gets most tokens, expert 5 none, with padding and null experts."""
  rng = np.random.default_rng(1)
  others = [e for e in range(NUM_EXPERTS) if e not in (HOT_EXPERT, COLD_EXPERT)]
  first = np.where(rng.random((GROUPS, TOKENS)) < 0.8, HOT_EXPERT, rng.choice(others,
                                                                              (GROUPS, TOKENS)))
  # Second choices: another real expert or one of two null experts (indices E and E + 1).
  second = rng.choice(others + [NUM_EXPERTS, NUM_EXPERTS + 1], (GROUPS, TOKENS))
  experts = np.stack([first, second], axis=-1).astype(np.int32)
  mask = np.ones((GROUPS, TOKENS), np.float32)
  mask[::3, -3:] = 0  # padding at the end of some sequences
  gates = rng.random((GROUPS, TOKENS, TOP_K)).astype(np.float32) + 0.1
  gates /= gates.sum(-1, keepdims=True)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  arrays = dict(x=normal(GROUPS, TOKENS, D_MODEL), experts=experts, gates=gates, mask=mask,
                w_gate=normal(NUM_EXPERTS, D_MODEL, D_EXPERT) / 4,
                w_up=normal(NUM_EXPERTS, D_MODEL, D_EXPERT) / 4,
                w_down=normal(NUM_EXPERTS, D_EXPERT, D_MODEL) / 6)
  return arrays, normal(GROUPS, TOKENS, D_MODEL)


def values_and_gradients(ffn, arrays, cotangent):
  """(y, kept, gradients of sum(y · cotangent) wrt x, gates, w_gate, w_up, w_down)."""
  def forward(x, gates, w_gate, w_up, w_down):
    return ffn(x, arrays['experts'], gates, arrays['mask'], w_gate, w_up, w_down)

  @jax.jit
  def run(x, gates, w_gate, w_up, w_down):
    (y, kept), vjp = jax.vjp(forward, x, gates, w_gate, w_up, w_down)
    return y, kept, vjp((cotangent, np.zeros(kept.shape, jax.dtypes.float0)))

  return jax.device_get(run(arrays['x'], arrays['gates'], arrays['w_gate'], arrays['w_up'],
                            arrays['w_down']))


def dropless_ffn(the_exchange):
  """The dropless pipeline through `the_exchange`: -> (y, kept)."""
  def ffn(x, experts, gates, mask, w_gate, w_up, w_down):
    return pipeline.token_choice(x, experts, gates, mask, (w_gate, w_up, w_down),
                                 num_experts=NUM_EXPERTS, capacity=None, exchange=the_exchange)
  return ffn


single_device_ffn = dropless_ffn(exchange.LOCAL)


def expert_parallel_ffn(mesh, native=None):
  """Expert parallel on `mesh`; `native` None: the platform's choice (`exchange.for_mesh`)."""
  return dropless_ffn(exchange.for_mesh(mesh) if native is None else
                      exchange.ExpertParallel(mesh, native=native))


def make_mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp', 'expert', 'tensor'), axis_types=AUTO4,
                       devices=jax.devices()[:8])


def test_skewed_problem_is_skewed():
  arrays, _ = skewed_problem()
  real = arrays['experts'][arrays['mask'] > 0]
  load = np.bincount(real.reshape(-1), minlength=NUM_EXPERTS + 2)
  assert load[HOT_EXPERT] > load.sum() / 3 and load[COLD_EXPERT] == 0
  assert load[NUM_EXPERTS:].sum() > 0 and (arrays['mask'] == 0).any()


@pytest.mark.parametrize('shape', [(1, 1, 8, 1), (1, 2, 2, 2), (2, 1, 4, 1)])
def test_expert_parallel_dropless_equals_single_device(shape):
  arrays, cotangent = skewed_problem()
  y, kept, grads = values_and_gradients(expert_parallel_ffn(make_mesh(shape)), arrays, cotangent)
  ref_y, ref_kept, ref_grads = values_and_gradients(single_device_ffn, arrays, cotangent)
  np.testing.assert_array_equal(kept, ref_kept)
  assert kept.sum() == ((arrays['mask'] > 0)[..., None] & (arrays['experts'] < NUM_EXPERTS)).sum()
  assert y.dtype == np.float32 and np.abs(ref_y).max() > 0.1
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  for name, grad, ref_grad in zip(('x', 'gates', 'w_gate', 'w_up', 'w_down'), grads, ref_grads):
    assert np.abs(ref_grad).max() > 1e-2, name  # every gradient is exercised
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6, err_msg=name)
  # The expert nobody chose gets no gradient; padding tokens get none either.
  assert not grads[2][COLD_EXPERT].any() and not grads[4][COLD_EXPERT].any()
  assert not grads[0][arrays['mask'] == 0].any()


ARGUMENTS = ('x', 'experts', 'gates', 'mask', 'w_gate', 'w_up', 'w_down')


def lowered_text(fn, arrays):
  return jax.jit(fn).lower(*[arrays[name] for name in ARGUMENTS]).as_text()


def psum_axes(jaxpr) -> list[tuple]:
  """The axes of every psum in a jaxpr and the jaxprs inside it (shard_map bodies...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith('psum'):
      found.append(tuple(eqn.params['axes']))
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)
      if hasattr(inner, 'eqns'):
        found += psum_axes(inner)
  return sorted(found)


def gradient_of(ffn, cotangent):
  def gradient(x, experts, gates, mask, w_gate, w_up, w_down):
    loss = lambda *a: jnp.sum(ffn(*a)[0] * cotangent)
    return jax.grad(loss, argnums=(0, 2, 4, 5, 6))(x, experts, gates, mask, w_gate, w_up, w_down)
  return gradient


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the emulation is the CPU path')
def test_cpu_uses_the_emulation_and_the_native_path_still_lowers():
  arrays, cotangent = skewed_problem()
  mesh = make_mesh((1, 2, 2, 2))
  # XLA:CPU cannot compile ragged_all_to_all, so by default the exchange is a dense all_to_all.
  emulated = expert_parallel_ffn(mesh)
  default = lowered_text(emulated, arrays)
  assert 'ragged_all_to_all' not in default and 'all_to_all' in default
  # The GPU/TPU path traces, types and lowers here; its gradient uses the primitive's
  # transpose, a ragged_all_to_all the other way round.
  native = expert_parallel_ffn(mesh, native=True)
  assert lowered_text(native, arrays).count('ragged_all_to_all(') == 2
  assert lowered_text(gradient_of(native, cotangent), arrays).count('ragged_all_to_all(') == 4
  # It cannot run here, but its gradient must reduce over the same axes as the emulation's
  # (received rows typed as not varying over the senders would be summed over them).
  args = [arrays[name] for name in ARGUMENTS]
  native_psums = psum_axes(jax.make_jaxpr(gradient_of(native, cotangent))(*args).jaxpr)
  assert native_psums == psum_axes(jax.make_jaxpr(gradient_of(emulated, cotangent))(*args).jaxpr)
  assert ('tensor',) in native_psums  # the parser finds psums where there are some
