"""model.moe.exchange_chunks: the expert exchange in independent chunks gives the results of one
exchange, and in the compiled step no chunk's exchange waits on another chunk's experts."""

import functools
import re

import jax
import numpy as np
import pytest

from moetrain import config as config_lib
from moetrain import hlo_stats
from moetrain.errors import ConfigError
from moetrain.parallel.mesh import make_mesh
from moetrain.state import build_model, init_state, make_setup
from moetrain.steps import make_eval_step
from tests.steps import first_gradients, random_batch

# Three expert-parallel layouts of 8 devices (data, fsdp, expert, tensor).
MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (1, 2, 2, 2)]


def chunk_config(mesh, chunks, capacity_factor, num_layers=1, overlap='experts'):
  data, fsdp, expert, tensor = mesh
  return config_lib.load('configs/tiny.py', [
      f'--config.model.moe.exchange_overlap={overlap}', '--config.model.moe.aux_loss=sequence',
      '--config.model.vocab_size=128', '--config.model.d_model=32', '--config.model.d_ff=64',
      f'--config.model.num_layers={num_layers}', '--config.model.max_seq_len=16',
      '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
      '--config.model.moe.num_experts=8',
      f'--config.model.moe.capacity_factor={capacity_factor}',
      f'--config.model.moe.eval_capacity_factor={capacity_factor}',
      f'--config.model.moe.exchange_chunks={chunks}',
      '--config.train.batch_size=32', '--config.train.seq_len=16',
      f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
      f'--config.mesh.expert={expert}', f'--config.mesh.tensor={tensor}'])


@functools.cache
def step_one(mesh, chunks, capacity_factor, overlap='experts'):
  config = chunk_config(mesh, chunks, capacity_factor, overlap=overlap)
  (grads, metrics, _), _ = first_gradients(config, jax.devices()[:8], random_batch(config))
  return grads, metrics


# Every mesh with both routings (capacity factor 1, dropless); the chunk counts take turns.
# Chunks of the whole block (exchange_overlap=block) on every mesh, both routings among them.
CASES = [((1, 1, 8, 1), 2, 1.0, 'experts'), ((1, 1, 8, 1), 4, 0.0, 'experts'),
         ((2, 1, 4, 1), 4, 1.0, 'experts'), ((2, 1, 4, 1), 2, 0.0, 'experts'),
         ((1, 2, 2, 2), 2, 1.0, 'experts'), ((1, 2, 2, 2), 4, 0.0, 'experts'),
         ((1, 1, 8, 1), 4, 0.0, 'block'), ((2, 1, 4, 1), 4, 1.0, 'block'),
         ((1, 2, 2, 2), 2, 1.0, 'block')]


@pytest.mark.parametrize('mesh,chunks,capacity_factor,overlap', CASES, ids=[
    f'{"x".join(map(str, mesh))}-{chunks}-{"capacity" if factor else "dropless"}-{overlap}'
    for mesh, chunks, factor, overlap in CASES])
def test_chunked_exchange_equals_one_exchange(mesh, chunks, capacity_factor, overlap):
  grads, metrics = step_one(mesh, chunks, capacity_factor, overlap)
  one_grads, one = step_one(mesh, 1, capacity_factor)
  if capacity_factor:
    assert one['dropped_fraction'].max() > 0  # capacity dropping is on
  for key in ('loss', 'aux_loss', 'z_loss', 'expert_fraction', 'dropped_fraction'):
    np.testing.assert_allclose(metrics[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, one_grads)


def forward_hlo(chunks, overlap='experts', **model):
  """The optimised HLO of one MoE layer's forward (an eval step) on 4 expert ranks (`model`:
  fields of the model section to set)."""
  config = chunk_config((1, 1, 4, 1), chunks, 1.0, overlap=overlap)
  config.model.update(model)
  setup = make_setup(config, make_mesh(config, jax.devices()[:4]))
  state = jax.eval_shape(lambda: init_state(setup))
  batch = jax.ShapeDtypeStruct((32, 16), np.int32, sharding=setup.batch_sharding)
  lowered = make_eval_step(setup).lower(state['params'], state['buffers'],
                                        {'inputs': batch, 'targets': batch})
  # Compiled afresh: the persistent cache ignores metadata, and may hand back an executable
  # whose op names (the exchange's scopes) come from an older build of the same program.
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    return lowered.compile().as_text()
  finally:
    jax.config.update('jax_enable_compilation_cache', True)


def exchange_upstream(hlo_text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
  """The all-to-alls of the expert exchange (GSPMD adds others, to reshard attention) with
  their direction (the exchange's `dispatch` and `combine` scopes), and for each the exchange
  all-to-alls its operands come from."""
  roles = dict(re.findall(r'%(all-to-all[\w.\-]*) = .*op_name="[^"]*shard_map/'
                          r'(dispatch|combine)/all_to_all"', hlo_text))
  exchanges = set(roles)
  computations, _, _ = hlo_stats.parse(hlo_text)
  # Names are unique in a module; a loop body's chains stop at its parameters.
  producers = {i.name: i for c in computations.values() for i in c.instructions}
  found = {}

  def upstream(name):
    if name not in found:
      found[name] = set()
      for operand in producers[name].operands if name in producers else ():
        found[name] |= upstream(operand) | ({operand} & exchanges)
    return found[name]

  return roles, {name: upstream(name) for name in exchanges}


@pytest.mark.parametrize('chunks,overlap', [(1, 'experts'), (4, 'experts'), (4, 'block')])
def test_no_chunk_exchange_waits_on_another_chunks_experts(chunks, overlap):
  roles, upstream = exchange_upstream(forward_hlo(chunks, overlap))
  dispatches = {name for name, role in roles.items() if role == 'dispatch'}
  assert len(dispatches) == chunks and len(roles) == 2 * chunks, roles
  # No chunk's dispatch comes after any exchange; each combine after its own dispatch alone.
  for name, before in upstream.items():
    if name in dispatches:
      assert not before, upstream
    else:
      assert len(before) == 1 and before <= dispatches, upstream
  # Every chunk's experts sit between its own dispatch and combine, so a dispatch with no
  # all-to-all upstream depends on no chunk's expert matmul.


@pytest.mark.parametrize('overlap', ['experts', 'block'])
def test_unrolled_layers_keep_the_block_chunks_apart(overlap):
  """Four layers scanned two to an iteration (model.scan_unroll=2): with chunks of the whole
  block, each chunk's exchanges of the two layers form a chain of their own, so one chunk's
  combine can overlap the other's next attention; with chunks of the experts the next layer
  waits for both chunks."""
  hlo = forward_hlo(2, overlap, num_layers=4, scan_layers=True, scan_unroll=2)
  roles, upstream = exchange_upstream(hlo)
  chains = []
  for name in sorted(roles, key=lambda n: len(upstream[n])):
    linked = {name} | upstream[name]
    joined = [chain for chain in chains if chain & linked]
    chains = [chain for chain in chains if not chain & linked] + [set().union(linked, *joined)]
  sizes = sorted(len(chain) for chain in chains)
  assert sizes == ([4, 4] if overlap == 'block' else [8]), chains


def matmuls_upstream(hlo_text: str, names) -> dict[str, set[str]]:
  """For each instruction of `names`, the matmuls (dots, fusions holding one) upstream of it
  that compute on the batch (downstream of the token inputs, this device's int32 rows)."""
  computations, entry, _ = hlo_stats.parse(hlo_text)
  instructions = {i.name: i for i in computations[entry].instructions}
  tokens = {name for name, i in instructions.items()
            if i.opcode == 'parameter' and i.result == [('s32', (8, 16))]}
  on_batch = {}

  def from_batch(name):
    if name not in on_batch:
      on_batch[name] = name in tokens or any(
          from_batch(o) for o in instructions[name].operands if o in instructions)
    return on_batch[name]

  def is_matmul(i):
    return i.opcode == 'dot' or (i.opcode == 'fusion' and
                                 computations[i.callee].dot_flops > 0)

  def upstream(name, seen):
    for operand in instructions[name].operands:
      if operand in instructions and operand not in seen:
        seen.add(operand)
        upstream(operand, seen)
    return seen

  return {name: {u for u in upstream(name, set())
                 if is_matmul(instructions[u]) and from_batch(u)} for name in names}


@pytest.mark.parametrize('overlap', ['experts', 'block'])
def test_block_chunks_share_no_matmul_before_their_exchange(overlap):
  """With exchange_overlap=block each chunk's dispatch follows its own attention and router
  only; with experts, every chunk's dispatch waits for the attention of all rows."""
  hlo = forward_hlo(4, overlap)
  roles, _ = exchange_upstream(hlo)
  dispatches = sorted(name for name, role in roles.items() if role == 'dispatch')
  before = matmuls_upstream(hlo, dispatches)
  assert all(before.values()), before  # the attention and router matmuls are found
  shared = set.intersection(*before.values())
  assert (not shared) == (overlap == 'block'), shared


def test_chunks_that_do_not_divide_the_groups_are_refused():
  config = chunk_config((1, 1, 8, 1), 3, 1.0)
  with pytest.raises(ConfigError, match=r'model.moe.exchange_chunks=3 must divide the 4 '):
    make_mesh(config, jax.devices()[:8])


def test_a_node_count_that_does_not_divide_the_expert_axis_is_refused():
  config = config_lib.load('configs/tiny.py', ['--config.mesh.expert=8',
                                               '--config.model.moe.exchange_nodes=3'])
  with pytest.raises(ConfigError, match=r'model.moe.exchange_nodes=3 must divide mesh.expert=8'):
    make_mesh(config, jax.devices()[:8])


@pytest.mark.parametrize('overlap', ['experts', 'block'])
def test_a_batch_the_chunks_do_not_divide_runs_in_one_chunk(overlap):
  """Decoding one row (or an odd evaluation batch) with a model trained in chunks: the chunks
  are a schedule, so such a batch runs in one, with the same logits."""
  logits = {}
  for chunks in (1, 2):
    config = chunk_config((1, 1, 1, 1), chunks, 1.0, overlap=overlap)
    logits[chunks], _ = build_model(config.model, 0).forward(np.ones((1, 16), np.int32))
  np.testing.assert_array_equal(logits[2], logits[1])
