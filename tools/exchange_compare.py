"""The expert exchange run flat, in chunks, two-level and in FP8, timed side by side.

  python tools/exchange_compare.py [--config configs/bench_e8k2.py] [--chunks 4] [--nodes 2]
      [--repeats 10] [--json out.json] [--dry-run] [--config.a.b=v …]

Every variant is the config with its `model.moe.exchange_*` fields set (`VARIANTS`): flat
(exchange_chunks=1, exchange_nodes=1, exchange_dtype=''), chunked (exchange_chunks=--chunks),
two-level (exchange_nodes=--nodes), fp8 (exchange_dtype=float8_e4m3fn), all three combined,
and combined in chunks of the whole block (exchange_overlap=block: timed as a train step only,
since the MoE layer alone has no attention to overlap).
The mesh puts every device on the 'expert' axis (override with --config.mesh.*), and the batch
gives each device --chunks sequences. Two comparisons, each variant against flat:
- layer: the forward and backward pass of one of the config's MoE layers (the model's `MoE`
  module) on the whole batch, all variants timed interleaved (`benchmark.time_steps`);
- step: the config's whole train step (`step_benchmarks.measure_train_step`).
A variant this build cannot run is skipped with the reason: its feature not implemented (the
MoE layer picks the same exchange as without it: `parallel.exchange.for_mesh`,
`models.two_level.node_aware`), or the config or the devices refusing it (a ConfigError).

--dry-run checks the script end to end on 8 CPU devices (it restarts itself with them): a tiny
model, one timed call per variant; its times say nothing about an accelerator.
"""

import json
import pathlib
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moetrain import config as config_lib  # noqa: E402
from moetrain.errors import ConfigError  # noqa: E402
from moetrain.models.moe import MoE  # noqa: E402
from moetrain.parallel import sharding  # noqa: E402
from moetrain.parallel.mesh import make_mesh  # noqa: E402

import benchmark  # noqa: E402
import step_benchmarks  # noqa: E402

FP8 = 'float8_e4m3fn'
DRY_RUN = ['--config.model.vocab_size=256', '--config.model.d_model=64',
           '--config.model.d_ff=128', '--config.model.moe.d_expert=128',
           '--config.model.num_layers=1',
           '--config.model.num_heads=4', '--config.model.num_kv_heads=4',
           '--config.model.max_seq_len=32', '--config.train.seq_len=32']
DRY_RUN_DEVICES = 8


def variants(chunks: int, nodes: int) -> dict:
  """Variant name → its model.moe.exchange_* fields."""
  flat = {'exchange_chunks': 1, 'exchange_nodes': 1, 'exchange_dtype': '',
          'exchange_overlap': 'experts'}
  combined = {'exchange_chunks': chunks, 'exchange_nodes': nodes, 'exchange_dtype': FP8,
              'exchange_overlap': 'experts'}
  return {'flat': flat, 'chunked': {**flat, 'exchange_chunks': chunks},
          'two-level': {**flat, 'exchange_nodes': nodes},
          'fp8': {**flat, 'exchange_dtype': FP8}, 'combined': combined,
          'combined, block': {**combined, 'exchange_overlap': 'block'}}


def load(args, fields: dict):
  """The config of one variant: the tool's mesh and batch, the user's overrides, `fields`."""
  devices = jax.device_count()
  defaults = [f'--config.mesh.expert={devices}', '--config.mesh.data=1',
              '--config.mesh.fsdp=1', '--config.mesh.tensor=1',
              f'--config.train.batch_size={args.chunks * devices}']
  if args.dry_run:
    defaults += DRY_RUN
  return config_lib.load(args.config, defaults + args.overrides + [
      f'--config.model.moe.{name}={value}' for name, value in fields.items()])


def _layer_exchange(model_config, mesh):
  """The exchange an MoE layer of `model_config` picks on `mesh` (built abstractly)."""
  return nnx.eval_shape(lambda: MoE(model_config, rngs=nnx.Rngs(params=0), mesh=mesh)).exchange


def unavailable(config, mesh) -> str | None:
  """Why this build cannot run `config`'s exchange on `mesh`; None if it can. A feature the
  build lacks leaves the MoE layer picking the same exchange as without it."""
  chosen = _layer_exchange(config.model, mesh)
  for field, off in (('exchange_dtype', ''), ('exchange_nodes', 1)):
    if config.model.moe[field] != off:
      without = config.model.copy_and_resolve_references()
      without.moe[field] = off
      if _layer_exchange(without, mesh) == chosen:
        return f'model.moe.{field}={config.model.moe[field]}: not available in this build'
  return None


def layer_step(config, mesh):
  """(jitted forward and backward of one MoE layer of `config` on `mesh`, its arguments)."""
  m, t = config.model, config.train
  graphdef, params, rest = nnx.split(MoE(m, rngs=nnx.Rngs(params=0), mesh=mesh), nnx.Param, ...)
  params, rest = (jax.device_put(nnx.to_pure_dict(state), sharding.param_shardings(state, mesh))
                  for state in (params, rest))
  x_BxLxD = jax.device_put(
      jax.random.normal(jax.random.key(1), (t.batch_size, t.seq_len, m.d_model), m.dtype),
      jax.sharding.NamedSharding(mesh, sharding.spec(mesh, 'batch', None, None)))
  mask_BxL = jnp.ones(x_BxLxD.shape[:2], jnp.float32)

  def loss(params, x_BxLxD):
    layer = nnx.merge(graphdef, params, rest)
    y_BxLxD, stats = layer(x_BxLxD, mask_BxL, m.moe.capacity_factor)
    return jnp.sum(y_BxLxD.astype(jnp.float32)) + stats.aux_loss

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BxLxD)


def compare(args) -> list[dict]:
  """One row per variant: layer and step seconds, or why it was skipped."""
  make_mesh(load(args, {}))  # the user's config, overrides and mesh, before any variant
  rows, layers = [], {}
  for name, fields in variants(args.chunks, args.nodes).items():
    row = {'variant': name, **fields}
    rows.append(row)
    try:
      config = load(args, fields)
      mesh = make_mesh(config)
      row['skipped'] = unavailable(config, mesh)
      if row['skipped']:
        continue
      if fields['exchange_overlap'] == 'experts':  # chunks of the block: the step shows them
        with jax.set_mesh(mesh):
          layers[name] = layer_step(config, mesh)
      row.update(step_benchmarks.measure_train_step(config, args.repeats))
      row['tokens_per_s'] = config.train.batch_size * config.train.seq_len / row['step_s']
    except ConfigError as error:
      row['skipped'] = str(error)
  for name, seconds in benchmark.time_steps(layers, args.repeats).items():
    next(row for row in rows if row['variant'] == name)['layer_s'] = seconds
  return rows


def report(rows) -> None:
  """The table: each variant's times and their ratio to flat's."""
  flat = rows[0]
  ratio = lambda row, key: f'{row[key] / flat[key]:6.2f}' if key in flat else f'{"—":>6}'
  header = (f'{"variant":<15} {"chunks":>6} {"nodes":>5} {"wire":<13} {"layer ms":>9} '
            f'{"÷ flat":>6} {"step ms":>9} {"÷ flat":>6} {"tokens/s":>12}')
  print(header)
  print('-' * len(header))
  for row in rows:
    wire = row['exchange_dtype'] or 'model.dtype'
    start = (f'{row["variant"]:<15} {row["exchange_chunks"]:6d} {row["exchange_nodes"]:5d} '
             f'{wire:<13}')
    if row.get('skipped'):
      print(f'{start} skipped: {row["skipped"]}')
      continue
    layer = (f'{1e3 * row["layer_s"]:9.2f} {ratio(row, "layer_s")}' if 'layer_s' in row else
             f'{"—":>9} {"—":>6}')
    print(f'{start} {layer} {1e3 * row["step_s"]:9.2f} {ratio(row, "step_s")} '
          f'{row["tokens_per_s"]:12,.0f}')


def main(argv=None) -> int:
  parser = config_lib.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/bench_e8k2.py')
  parser.add_argument('--chunks', type=int, default=4, help='exchange_chunks of chunked')
  parser.add_argument('--nodes', type=int, default=2, help='exchange_nodes of two-level')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--json', help='also write the results to this JSON file')
  parser.add_argument('--dry-run', action='store_true',
                      help=f'a tiny model on {DRY_RUN_DEVICES} CPU devices, one call each')
  try:
    args, args.overrides = config_lib.parse_with_overrides(parser, argv)
    if args.dry_run:
      step_benchmarks.ensure_cpu_devices(DRY_RUN_DEVICES)
      args.repeats = 1
    device = jax.devices()[0]
    print(f'{args.config} on {jax.device_count()} × {device.device_kind} ({device.platform}), '
          f'jax {jax.__version__}, median of {args.repeats}', flush=True)
    rows = compare(args)
  except ConfigError as error:
    print(f'exchange_compare: error: {error}', file=sys.stderr)
    return 2
  report(rows)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
