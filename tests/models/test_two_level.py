"""The two-level exchange: on meshes whose expert axis spans several nodes it gives the flat
exchange's and one device's values and gradients, drops exactly as documented, sends a token
across nodes once per node it needs, and refuses device layouts it cannot split into nodes."""

import functools
import types

import jax
import ml_collections
import numpy as np
import pytest

from moetrain import hlo_stats
from moetrain.errors import ConfigError
from moetrain.models import pipeline, routing, two_level
from moetrain.parallel import exchange, fp8

GROUPS, TOKENS, D_MODEL, D_EXPERT, NUM_EXPERTS = 8, 16, 32, 24, 16
AUTO4 = (jax.sharding.AxisType.Auto,) * 4


def make_mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp', 'expert', 'tensor'), axis_types=AUTO4,
                       devices=jax.devices()[:8])


def problem(seed=0, top_k=4, num_groups=1, topk_groups=1, tokens=TOKENS, d_model=D_MODEL):
  """Random tokens, (group-limited) softmax top-k routing, priorities, some padding, weights."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  scores = routing.router_probabilities(normal(GROUPS, tokens, NUM_EXPERTS))
  experts = routing.select_experts(scores, top_k, num_groups=num_groups, topk_groups=topk_groups)
  mask = np.ones((GROUPS, tokens), np.float32)
  mask[::3, -3:] = 0
  return dict(x=normal(GROUPS, tokens, d_model), experts=np.asarray(experts),
              gates=np.asarray(routing.gate_weights(scores, experts, normalize=True)), mask=mask,
              priority=rng.random((GROUPS, tokens)).astype(np.float32),
              w_gate=normal(NUM_EXPERTS, d_model, D_EXPERT) / 4,
              w_up=normal(NUM_EXPERTS, d_model, D_EXPERT) / 4,
              w_down=normal(NUM_EXPERTS, D_EXPERT, d_model) / 6), normal(GROUPS, tokens, d_model)


def ffn(token_choice, arrays, **options):
  """(x, gates, w_gate, w_up, w_down) -> (y, kept) by `token_choice` (the pipeline's signature)."""
  def forward(x, gates, *weights):
    return token_choice(x, arrays['experts'], gates, arrays['mask'], weights,
                        num_experts=NUM_EXPERTS, **options)
  return forward


ARGUMENTS = ('x', 'gates', 'w_gate', 'w_up', 'w_down')


def training_step(forward, cotangent):
  """(x, gates, w_gate, w_up, w_down) -> (y, kept, gradients of sum(y · cotangent) wrt them)."""
  @jax.jit
  def step(*args):
    (y, kept), vjp = jax.vjp(forward, *args)
    return y, kept, vjp((cotangent, np.zeros(kept.shape, jax.dtypes.float0)))
  return step


def values_and_gradients(forward, arrays, cotangent):
  return jax.device_get(training_step(forward, cotangent)(*[arrays[n] for n in ARGUMENTS]))


def two_level_exchange(shape, nodes, num_groups=1, topk_groups=1, wire_dtype=''):
  flat = exchange.ExpertParallel(make_mesh(shape), wire_dtype=wire_dtype)
  moe = ml_collections.ConfigDict(dict(exchange_nodes=nodes, num_groups=num_groups,
                                       topk_groups=topk_groups))
  two = two_level.node_aware(flat, moe)
  assert isinstance(two, two_level.TwoLevel) and two.nodes == nodes
  return flat, two


def assert_same(result, reference):
  y, kept, grads = result
  ref_y, ref_kept, ref_grads = reference
  np.testing.assert_array_equal(kept, ref_kept)
  assert np.abs(ref_y).max() > 0.1
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  for name, grad, ref_grad in zip(ARGUMENTS, grads, ref_grads):
    scale = np.abs(ref_grad).max()
    assert scale > 1e-2, name  # every gradient is exercised
    # A gradient entry sums products in another order on each path: its float32 rounding is
    # relative to the terms, so the bound is too (a small entry may come from large terms).
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


def real_assignments(arrays):
  return (arrays['mask'] > 0)[..., None] & (arrays['experts'] < NUM_EXPERTS)


@functools.cache
def dropless_single_device():
  arrays, cotangent = problem()
  return values_and_gradients(ffn(pipeline.token_choice, arrays, capacity=None), arrays,
                              cotangent)


@pytest.mark.parametrize('shape, nodes', [((1, 1, 8, 1), 2), ((1, 1, 8, 1), 4),
                                          ((1, 2, 2, 2), 2)], ids=['2x4', '4x2', '2x1-fsdp-tp'])
def test_without_drops_two_level_equals_flat_and_dropless_one_device(shape, nodes):
  arrays, cotangent = problem()
  flat, two = two_level_exchange(shape, nodes)
  options = dict(capacity=TOKENS)  # every expert can take every token: nothing drops
  result = values_and_gradients(ffn(two.token_choice, arrays, **options), arrays, cotangent)
  flat_result = values_and_gradients(
      ffn(functools.partial(pipeline.token_choice, exchange=flat), arrays, **options), arrays,
      cotangent)
  assert result[1].sum() == real_assignments(arrays).sum()
  assert_same(result, flat_result)
  assert_same(result, dropless_single_device())
  assert not result[2][0][arrays['mask'] == 0].any()  # padding gets no gradient


@pytest.mark.parametrize('priority, backend', [(False, 'capacity'), (True, 'einsum')])
def test_expert_drops_equal_the_flat_exchange_while_node_capacity_holds(priority, backend):
  arrays, cotangent = problem(seed=1, top_k=2)
  flat, two = two_level_exchange((1, 1, 8, 1), 2)
  # C = 3 for the 2 rows an expert gets per group on average: busy experts drop; the node
  # capacity for it, ceil(3·16·m / (2·2)) with m ≈ 1.53 nodes per token, is every token.
  assert two_level.node_capacity(3, TOKENS, 2, NUM_EXPERTS, 2, two.reachable) == TOKENS
  options = dict(capacity=3, backend=backend,
                 priority_GxT=arrays['priority'] if priority else None)
  result = values_and_gradients(ffn(two.token_choice, arrays, **options), arrays, cotangent)
  flat_result = values_and_gradients(
      ffn(functools.partial(pipeline.token_choice, exchange=flat), arrays, **options), arrays,
      cotangent)
  assert 0 < flat_result[1].sum() < real_assignments(arrays).sum()
  assert_same(result, flat_result)


def node_capacity_reference(arrays, nodes, capacity):
  """The documented node drop, by loops: each node takes a group's first `capacity` tokens
  that need it, in token order; the choices of a token on a node it lost become null."""
  experts = arrays['experts'].copy()
  per_node = NUM_EXPERTS // nodes
  for g in range(GROUPS):
    taken = [0] * nodes
    for t in range(TOKENS):
      needed = {e // per_node for e in experts[g, t] if arrays['mask'][g, t] > 0}
      for n in sorted(needed):
        taken[n] += 1
        if taken[n] > capacity:
          experts[g, t][experts[g, t] // per_node == n] = NUM_EXPERTS
  return dict(arrays, experts=experts)


def test_node_capacity_drops_whole_token_node_pairs_then_experts_drop_as_flat():
  arrays, cotangent = problem(seed=2)
  flat, two = two_level_exchange((1, 1, 8, 1), 2)
  rows = two_level.node_capacity(2, TOKENS, 4, NUM_EXPERTS, 2, two.reachable)
  assert rows == 8  # ceil(2·16·1.92 / (2·4)): fewer than the ~15 tokens needing each node
  result = values_and_gradients(ffn(two.token_choice, arrays, capacity=2), arrays, cotangent)
  # Two-level = the flat routing on one device after the node drops.
  surviving = node_capacity_reference(arrays, 2, rows)
  reference = values_and_gradients(ffn(pipeline.token_choice, surviving, capacity=2), arrays,
                                   cotangent)
  assert_same(result, reference)
  # They drop differently from the flat exchange, which never drops a whole node.
  flat_kept = values_and_gradients(ffn(functools.partial(pipeline.token_choice, exchange=flat),
                                       arrays, capacity=2), arrays, cotangent)[1]
  assert (surviving['experts'] != arrays['experts']).any()
  assert (flat_kept != result[1]).any() and flat_kept.sum() > result[1].sum()


def inter_and_other_all_to_all_bytes(hlo_text, node_of_device):
  """Per-device result bytes of the compiled all-to-alls whose replica groups cross nodes,
  and of the others."""
  inter = other = 0
  for collective, times in hlo_stats.module_stats(hlo_text).collectives:
    if collective.kind != 'all-to-all':
      continue
    assert collective.groups, 'every all-to-all names its replica groups'
    crosses = any(len({node_of_device[d] for d in group}) > 1 for group in collective.groups)
    if crosses:
      inter += times * collective.result_bytes
    else:
      other += times * collective.result_bytes
  return inter, other


@pytest.mark.parametrize('topk_groups', [1, 2])
def test_inter_node_bytes_follow_the_nodes_a_token_needs(topk_groups):
  tokens, top_k, nodes = 64, 8, 2
  arrays, cotangent = problem(seed=3, top_k=top_k, num_groups=nodes, topk_groups=topk_groups,
                              tokens=tokens, d_model=128)
  flat, two = two_level_exchange((1, 1, 8, 1), nodes, num_groups=nodes,
                                 topk_groups=topk_groups)
  capacity = routing.expert_capacity(tokens, top_k, NUM_EXPERTS, 1.0, 4)
  node_of_device = {d: d // 4 for d in range(8)}  # partition id = expert rank on this mesh

  def all_to_all_bytes(token_choice):
    # Outputs and gradients, as in training: a gradient alone would not need y back home.
    step = training_step(ffn(token_choice, arrays, capacity=capacity), cotangent)
    hlo = step.lower(*[arrays[name] for name in ARGUMENTS]).compile().as_text()
    return inter_and_other_all_to_all_bytes(hlo, node_of_device)

  flat_inter, flat_other = all_to_all_bytes(functools.partial(pipeline.token_choice,
                                                              exchange=flat))
  inter, intra = all_to_all_bytes(two.token_choice)
  assert flat_inter > 0 and flat_other == 0  # the flat all_to_all spans all 8 devices
  assert intra > 0  # the fan-out to the experts stays inside the nodes
  per_node = NUM_EXPERTS // nodes
  real = arrays['experts'][arrays['mask'] > 0]
  distinct = np.mean([len(set(e // per_node)) for e in real])
  assert distinct == pytest.approx(topk_groups, abs=0.01)
  assert inter <= 1.1 * distinct / top_k * flat_inter, (inter / flat_inter, distinct / top_k)


def fake_devices(keys, shape, platform='cpu'):
  """Stand-ins for the mesh's devices: process `keys[i]` (or TPU slice) at flat position i."""
  devices = np.empty(len(keys), object)
  for i, key in enumerate(keys):
    devices[i] = types.SimpleNamespace(platform=platform, process_index=key, slice_index=key)
  return devices.reshape(shape)


def test_nodes_come_from_the_devices_or_the_config():
  assert two_level.expert_nodes(fake_devices([0, 0, 0, 0, 1, 1, 1, 1], (1, 1, 8, 1))) == 2
  # Data-parallel replicas on other hosts: every expert line splits the same way.
  assert two_level.expert_nodes(fake_devices([0, 0, 1, 1, 2, 2, 3, 3], (2, 1, 4, 1))) == 2
  assert two_level.expert_nodes(fake_devices([0] * 4 + [1] * 4, (2, 1, 4, 1))) == 1
  assert two_level.expert_nodes(fake_devices([0] * 8, (1, 1, 8, 1)), configured=4) == 4
  # On TPU the hosts of one slice share the fast fabric: only slices are nodes.
  tpu_hosts = fake_devices([0] * 8, (1, 1, 8, 1), platform='tpu')
  for i, device in enumerate(tpu_hosts.flat):
    device.process_index = i // 2
  assert two_level.expert_nodes(tpu_hosts) == 1


@pytest.mark.parametrize('keys, shape', [
    ([0, 1, 0, 1, 0, 1, 0, 1], (1, 1, 8, 1)),  # interleaved
    ([0, 0, 0, 1, 1, 1, 1, 1], (1, 1, 8, 1)),  # unequal runs
    ([0, 0, 1, 1, 2, 2, 2, 2], (2, 1, 4, 1)),  # one line split, the other not
])
def test_a_node_map_that_is_not_equal_consecutive_runs_is_refused_in_one_line(keys, shape):
  with pytest.raises(ConfigError, match='model.moe.exchange_nodes') as error:
    two_level.expert_nodes(fake_devices(keys, shape))
  assert '\n' not in str(error.value)


def test_node_capacity_follows_the_capacity_factor_and_the_reachable_nodes():
  assert two_level.reachable_nodes(4) == 4
  assert two_level.reachable_nodes(4, num_groups=8, topk_groups=3) == 3
  assert two_level.reachable_nodes(4, num_groups=2, topk_groups=1) == 2
  assert two_level.expected_nodes(8, 8, 1) == 1.0
  assert two_level.expected_nodes(8, 8, 2) == pytest.approx(2 * (1 - 1 / 12870))
  assert two_level.expected_nodes(1, 8, 4) == pytest.approx(1.0)
  # k = 8 over 2 nodes at cf 1 (C = ceil(64·8 / 16) = 32): one node per token needs T/2 rows.
  assert two_level.node_capacity(32, 64, 8, 16, 2, 1) == 32
  assert two_level.node_capacity(32, 64, 8, 16, 2, 2) == 64
  assert two_level.node_capacity(1, 64, 8, 16, 2, 1) == 1
  # 4 nodes of 4 experts, m = 4·(1 - C(12, 8) / C(16, 8)) ≈ 3.85: ceil(5·16·3.85 / 32) = 10.
  assert two_level.node_capacity(5, 64, 8, 16, 4, 4) == 10


def test_dropless_falls_back_to_the_flat_exchange():
  arrays, cotangent = problem()
  flat, two = two_level_exchange((1, 1, 8, 1), 2)
  assert two.rows_to_experts == flat.rows_to_experts
  result = values_and_gradients(
      ffn(functools.partial(pipeline.token_choice, exchange=two), arrays, capacity=None), arrays,
      cotangent)
  assert_same(result, dropless_single_device())
  # One process on the test machine: one node, the flat exchange itself.
  assert two_level.node_aware(flat) is flat


def test_fp8_rows_cross_nodes_quantised_and_gradients_pass_straight_through():
  """With an FP8 wire the rows crossing nodes are the two-level exchange's rows of the
  quantised tokens, and every gradient is the one at those tokens (straight through)."""
  arrays, cotangent = problem()
  _, two = two_level_exchange((1, 1, 8, 1), 2)
  _, two_fp8 = two_level_exchange((1, 1, 8, 1), 2, wire_dtype='float8_e4m3fn')
  quantised = {**arrays, 'x': np.asarray(fp8.dequantize(*fp8.quantize(arrays['x']), np.float32))}
  assert not np.array_equal(quantised['x'], arrays['x'])
  options = dict(capacity=TOKENS // 2)
  result = values_and_gradients(ffn(two_fp8.token_choice, arrays, **options), arrays, cotangent)
  assert_same(result, values_and_gradients(ffn(two.token_choice, quantised, **options),
                                           quantised, cotangent))


def test_fp8_rows_shrink_the_bytes_crossing_nodes_by_their_wire_width():
  """Forward, the token rows are the only float rows that cross nodes towards the experts: the
  FP8 wire sends W = D + 4·ceil(D/128) bytes of each instead of 4·D (float32 here)."""
  arrays, _ = problem()
  node_of_device = {d: d // 4 for d in range(8)}

  def inter_bytes(wire_dtype):
    _, two = two_level_exchange((1, 1, 8, 1), 2, wire_dtype=wire_dtype)
    forward = jax.jit(ffn(two.token_choice, arrays, capacity=TOKENS // 2))
    hlo = forward.lower(*[arrays[name] for name in ARGUMENTS]).compile().as_text()
    return inter_and_other_all_to_all_bytes(hlo, node_of_device)[0]

  rows = GROUPS // 8 * two_level.node_capacity(TOKENS // 2, TOKENS, 4, NUM_EXPERTS, 2, 2) * 2
  wire = D_MODEL + 4 * fp8.num_blocks(D_MODEL)
  assert inter_bytes('') - inter_bytes('float8_e4m3fn') == rows * (4 * D_MODEL - wire)
