"""A pipelined train step's cost on a target, from stand-ins compiled without the stage axis, and
the stage count a config needs (`config.mesh.stage`, `stage_cost` for the schedule).

One stage of S on N devices is the same computation as the model without stages on N/S devices
(the other mesh axes unchanged), its stack cut to the stage's U/S units: GSPMD runs everything
inside a stage as it would without stages. Two such stand-ins are compiled (`cost_model.
step_cost`) for one microbatch (B/M sequences, `train.microbatches=1`), with u = U/S and 2u
stack units; every figure x they give (FLOPs, bytes per collective and link) is split into one
unit's share and the rest, x_unit = (x_2u − x_u) / u and x_rest = x_u − u·x_unit, and the
pipelined step, per device, is
  x = T·K·x_unit + c·x_rest,
with T·K = (M·R + S − 1)·U/(S·R) unit runs of one microbatch per stage and step (the bubble's
placeholder runs included: they compute, gather weights and exchange tokens like real ones),
and for the rest (embedding, leading dense and trailing blocks, head, optimizer update) c =
M/S for FLOPs and memory traffic (the stage's B/S sequences instead of B/M) and c = 1 for
collectives (its weights gathered and reduced once per pass, as in the stand-in). Collectives
inside the stack counting once per unit run is the brief of `parallel.stages` (gathers once per
iteration); its gradient reductions are counted the same way, an upper bound if GSPMD
accumulates them across iterations first. To those come the bytes over the stage axis
(`stage_cost.stage_bytes`) and the reduction over the stages of the gradients of the weights
outside the stack, which every stage holds: an all-reduce, 2·(S − 1)/S of their bytes.

Memory: the parameters and optimizer state are the stand-in's (the stage's U/S units plus
everything outside the stack, exact from the shardings), the activations
`summary.activation_bytes` with stages.
"""

import dataclasses

import jax

from moetrain import config_checks, cost_model, fp8_cost, hardware, stage_cost, summary
from moetrain.errors import ConfigError
from moetrain.models.transformer import layer_plan
from moetrain.parallel import stages as schedule
from moetrain.parallel.mesh import AXES, check_layout, mesh_shape


@dataclasses.dataclass
class PipelinedCost(cost_model.StepCost):
  """A pipelined step's per-device figures (`StepCost`'s fields, modelled) and its schedule."""
  stages: int
  microbatches: int
  repeats: int
  iterations: int
  bubble: float  # (S − 1) / T
  stage_bytes: dict  # stage_cost.stage_bytes, plus 'gradients' (the stages' all-reduce)
  stage_link: dict  # node size -> 'intra' or 'inter', where the stage groups run
  stack_params: float  # bytes per device of the stage's units' weights

  @property
  def minimum_traffic(self) -> float:
    """`StepCost.minimum_traffic`, with the stage's stack weights read forward and backward in
    every iteration (T/R times each, not once): + 2·(T/R − 1)·stack weights."""
    reads = 2 * (self.iterations / self.repeats - 1) * self.stack_params
    return super().minimum_traffic + reads


def folded_config(config, units: int):
  """`config` as one stage's stand-in: no stage axis, `units` stack units, one microbatch
  of B/M sequences."""
  folded = config.copy_and_resolve_references()
  m, t = folded.model, folded.train
  dense, moe_units, length, tail = layer_plan(m)
  m.num_layers = dense + units * length + tail if moe_units else units
  m.pipeline_repeats = 1
  t.batch_size //= t.microbatches
  t.microbatches = 1
  folded.mesh.stage = 1
  return folded


def _combine(unit, rest, runs: float, rest_scale: float):
  """runs·unit + rest_scale·rest over nested dicts of floats (and plain floats)."""
  if isinstance(unit, dict):
    keys = set(unit) | set(rest)
    return {k: _combine(unit.get(k, 0.0), rest.get(k, 0.0), runs, rest_scale) for k in keys}
  return runs * unit + rest_scale * rest


def _split_values(a, b, units: int):
  """(one unit's share, the rest) of a figure from stand-ins of u and 2u units: b − a and
  2a − b over u, leaf by leaf of nested dicts."""
  if isinstance(a, dict):
    keys = set(a) | set(b)
    pairs = {k: _split_values(a.get(k, 0.0), b.get(k, 0.0), units) for k in keys}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
  unit = (b - a) / units
  return unit, a - units * unit


def pipelined_cost(config, devices: int) -> PipelinedCost:
  """The train step of `config` (its `mesh.stage` = S, resolved: not -1) on `devices` target
  devices, modelled from two stage stand-ins compiled on N/S of this process's devices."""
  m, t = config.model, config.train
  stages, repeats, micro = config.mesh.stage, m.pipeline_repeats, t.microbatches
  units = stage_cost.stack_units(m) // stages
  local = jax.devices()[:devices // stages]
  small = cost_model.step_cost(folded_config(config, units), local)
  large = cost_model.step_cost(folded_config(config, 2 * units), local)
  mesh = {**small.mesh, 'stage': stages}
  steps = schedule.iterations(stages, micro, repeats)
  runs = steps * stage_cost.chunk_units(config, stages)
  flops = _combine(*_split_values(small.flops, large.flops, units), runs, micro / stages)
  accessed = _combine(*_split_values(small.bytes_accessed, large.bytes_accessed, units), runs,
                      micro / stages)
  sent = _combine(*_split_values(small.collective_bytes, large.collective_bytes, units), runs, 1.0)
  links = _combine(*_split_values(small.link_bytes, large.link_bytes, units), runs, 1.0)
  unit_params, rest_params = _split_values(small.estimated_memory['params'],
                                           large.estimated_memory['params'], units)
  stage = stage_cost.stage_bytes(config, mesh)
  stage['gradients'] = 2 * (stages - 1) / stages * rest_params
  where = {size: stage_cost.stage_link(mesh, size) for size in links}
  for role, value in stage.items():
    sent[f'stage {role}'] = value
    for size, link in where.items():
      links[size][f'stage {role}'] = {'intra': 0.0, 'inter': 0.0, link: value}
  groups = {**small.collective_groups, **{f'stage {role}': stages for role in stage}}
  exchange = small.exchange and dataclasses.replace(
      small.exchange, mesh=mesh, pipelines=small.exchange.pipelines * runs // units,
      expert_flops=small.exchange.expert_flops * runs / units,
      block_flops=small.exchange.block_flops * runs / units)
  heads = small.mesh.get('tensor', 1)  # 'heads' → tensor (parallel.sharding.RULES)
  activations = summary.activation_bytes(config, mesh, heads)
  memory = {'params': small.estimated_memory['params'],
            'optimizer': small.estimated_memory['optimizer'], 'activations': activations}
  memory['total'] = sum(memory.values())
  return PipelinedCost(
      devices=devices, mesh=mesh, tokens=t.batch_size * t.seq_len,
      compile_seconds=small.compile_seconds + large.compile_seconds,
      xla_flops=small.xla_flops, flops=flops, xla_bytes_accessed=small.xla_bytes_accessed,
      bytes_accessed=accessed, collective_bytes=sent, collective_groups=groups,
      link_bytes=links, exchange=exchange, xla_memory=small.xla_memory,
      estimated_memory=memory, fp8_fraction=fp8_cost.fp8_fraction(config, cost_model.hand_flops),
      stages=stages, microbatches=micro, repeats=repeats,
      iterations=steps, bubble=schedule.bubble_fraction(stages, micro, repeats),
      stage_bytes=stage, stage_link=where, stack_params=units * unit_params)


def with_stages(config, stages: int):
  """`config` with `mesh.stage` = `stages` and at least that many microbatches (the pipeline
  needs one per stage); the mesh axis of size -1 takes the devices the stages leave."""
  staged = config.copy_and_resolve_references()
  staged.mesh.stage = stages
  staged.train.microbatches = max(staged.train.microbatches, stages)
  return staged


def stage_candidates(config, devices: int) -> list[int]:
  """Stage counts S, ascending, that `config` can run with on `devices`: S divides the stack's
  U / R units and the devices, and `with_stages(config, S)` passes the config and layout checks
  (microbatches a multiple of the batch shards, …)."""
  units = stage_cost.stack_units(config.model) // config.model.pipeline_repeats
  found = []
  for stages in range(1, units + 1):
    if units % stages or devices % stages:
      continue
    staged = with_stages(config, stages)
    try:
      config_checks.validate(staged)
      check_layout(staged, mesh_shape(staged.mesh, devices))
    except ConfigError:
      continue
    found.append(stages)
  return found


def stage_cost_rows(config, devices: int, chips, stages=None) -> list[dict]:
  """For each stage count (default: every `stage_candidates`), its modelled step (`cost`:
  `cost_model.step_cost` of the real step without stages, `pipelined_cost` with) and
  `cost_model.roofline` on each chip of `chips` (names in `hardware.CHIPS`)."""
  model_flops = cost_model.hand_flops(config)['model']
  rows = []
  for count in stages or stage_candidates(config, devices):
    staged = with_stages(config, count)
    staged.mesh.update(dict(zip(AXES, mesh_shape(staged.mesh, devices))))
    cost = (pipelined_cost(staged, devices) if count > 1 else
            cost_model.step_cost(staged, jax.devices()[:devices]))
    rows.append({'stages': count, 'microbatches': staged.train.microbatches, 'cost': cost,
                 'roofline': {chip: cost_model.roofline(cost, model_flops, hardware.CHIPS[chip])
                              for chip in chips}})
  return rows


def pick_stages(rows: list[dict], chip: str, by: str = 'memory') -> dict | None:
  """The row (of `stage_cost_rows`) whose memory estimate fits `chip` with the fewest stages
  (`by='memory'`) or the shortest modelled step (`by='time'`, fewer stages on a tie); None
  when none fits."""
  fitting = [row for row in rows if row['roofline'][chip]['fits']]
  key = {'memory': lambda row: row['stages'],
         'time': lambda row: (row['roofline'][chip]['step_s'], row['stages'])}[by]
  return min(fitting, key=key, default=None)
