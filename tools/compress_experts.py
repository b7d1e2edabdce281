"""Prunes or merges the routed experts of a moetrain checkpoint (docs/compress.md).

  python tools/compress_experts.py prune CHECKPOINT OUT --keep N [--by frequency|mass]
  python tools/compress_experts.py prune CHECKPOINT OUT --min-mass F [--skip-ratio B]
  python tools/compress_experts.py merge CHECKPOINT OUT --keep N [--similarity router]

Every MoE layer keeps N experts (its layers share one count), chosen from that layer's routing
statistics on `--batches` calibration batches of the checkpoint's train split; `--config.data.*`
(and `--config.train.*`) overrides pick any other data, `--config.mesh.*` the mesh: the weights
are restored, edited and written in its shardings. The eval loss is printed before and
after, on the same eval batches. OUT holds weights only and the changed config: train from it
with `--config.init.from_checkpoint=OUT`, load it with `moetrain.load(OUT)`. Bad input prints
one line and exits with status 2, having written nothing.
"""

import os
import pathlib
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moetrain.config import CommandParser  # noqa: E402
from moetrain.errors import ConfigError  # noqa: E402

_OVERRIDABLE = ('--config.data.', '--config.train.', '--config.mesh.')


def _parser():
  parser = CommandParser(prog='compress_experts', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True, parser_class=CommandParser)
  prune = commands.add_parser('prune', help='drop the least used experts (Lu et al. 2024)')
  merge = commands.add_parser('merge', help='merge similar experts (MC-SMoE, HC-SMoE)')
  for sub in (prune, merge):
    sub.add_argument('checkpoint', help='training workdir or converted checkpoint')
    sub.add_argument('out_dir', help='new moetrain checkpoint directory')
    sub.add_argument('--batches', type=int, default=8,
                     help='calibration batches of the train split (default 8)')
    sub.add_argument('--eval-batches', type=int, default=0,
                     help='eval batches for the losses (default: train.eval_batches)')
  merge.add_argument('--keep', type=int, required=True, help='experts per MoE layer after')
  merge.add_argument('--similarity', choices=('router',), default='router',
                     help="how alike two experts are: the cosine similarity of their router "
                     'columns')
  amount = prune.add_mutually_exclusive_group(required=True)
  amount.add_argument('--keep', type=int, help='experts per MoE layer after')
  amount.add_argument('--min-mass', type=float, help='keep the fewest experts carrying this '
                      "fraction of each layer's gate mass (the largest count over layers)")
  prune.add_argument('--by', choices=('frequency', 'mass'), default='frequency',
                     help='rank experts by routing frequency or gate mass (default frequency)')
  prune.add_argument('--skip-ratio', type=float, default=0.0,
                     help='write model.moe.skip_ratio: outside training, skip later choices '
                     'whose gate is below this fraction of the first (default 0: off)')
  return parser


def _check(args, moe) -> None:
  """ConfigError naming the flag or field unless the request fits the model `moe`."""
  if not moe.num_experts:
    raise ConfigError(f'{args.checkpoint}: a dense model (model.moe.num_experts=0) has no '
                      f'experts to {args.command}')
  if moe.router == 'expert_choice':
    raise ConfigError(f'{args.checkpoint}: model.moe.router=expert_choice has no per-token '
                      f'choices to {args.command} by')
  if args.batches < 1:
    raise ConfigError(f'--batches {args.batches}: must be >= 1')
  if args.eval_batches < 0:
    raise ConfigError(f'--eval-batches {args.eval_batches}: must be >= 1, or 0 for '
                      'train.eval_batches')
  if args.keep is not None:
    least = moe.top_k if args.command == 'prune' else 1
    if not least <= args.keep <= moe.num_experts:
      raise ConfigError(f'--keep {args.keep}: must be between {least} and '
                        f'model.moe.num_experts={moe.num_experts}'
                        + (f' (model.moe.top_k={moe.top_k})' if least > 1 else ''))
  if args.command == 'prune':
    if moe.router_outputs > moe.num_experts:
      raise ConfigError(f'{args.checkpoint}: merged experts (model.moe.router_outputs='
                        f'{moe.router_outputs}) cannot be pruned; prune before merging')
    if args.min_mass is not None and not 0 < args.min_mass <= 1:
      raise ConfigError(f'--min-mass {args.min_mass}: must be in (0, 1]')
    if not 0 <= args.skip_ratio < 1:
      raise ConfigError(f'--skip-ratio {args.skip_ratio}: must be in [0, 1)')


def restored(checkpoint_dir, overrides=()):
  """(the setup a checkpoint's statistics are taken on: its own mesh and data with
  `overrides`, routed dropless; its params and buffers restored in that setup's shardings)."""
  import jax
  from moetrain import checkpoint, config as config_lib, exchange_model
  from moetrain.parallel.mesh import make_mesh
  from moetrain.state import abstract_state, make_setup
  config = checkpoint.model_config(checkpoint_dir)
  calibrated = config_lib.with_overrides(config.copy_and_resolve_references(), overrides)
  calibrated.model.moe.eval_capacity_factor = 0.0
  mesh = make_mesh(calibrated)
  exchange_model.resolve_exchange_chunks(calibrated, mesh)
  setup = make_setup(calibrated, mesh)
  abstract = abstract_state(setup)
  with jax.set_mesh(mesh):
    params, buffers = checkpoint.restore_weights(checkpoint_dir, abstract['params'],
                                                 abstract['buffers'], config)
  return setup, params, buffers


def calibration(setup, params, buffers, num_batches: int, progress=None) -> dict:
  """Per MoE layer and router output over `num_batches` train batches (padding excluded):
  {'frequency' [N, R] (share of the layer's assignments), 'mass' [N, R] (gate mass)}."""
  import jax
  import numpy as np
  from moetrain import steps, trainer
  from moetrain.data.inputs import fixed_batches, load_tokenizer
  from moetrain.parallel import sharding
  config = setup.config
  step = steps.make_eval_step(setup, with_stats=True)
  batches = fixed_batches(config, load_tokenizer(config), 'train', num_batches,
                          sharding.process_rows(setup.batch_sharding, config.train.batch_size))
  load, mass = 0.0, 0.0
  with jax.set_mesh(setup.mesh):
    for batch in batches:
      _, _, stats = step(params, buffers, trainer.global_batch(setup, batch))
      load, mass = load + np.asarray(stats.assignments_E), mass + np.asarray(stats.gate_mass_E)
      if progress:
        progress()
  return {'frequency': load / np.maximum(load.sum(-1, keepdims=True), 1.0), 'mass': mass}


def _routers(setup, params, buffers) -> dict:
  """Every MoE layer's router [D, R'] and router map [R] by flat name, on the host: small
  arrays, gathered alone (the experts stay where they are)."""
  import jax
  import numpy as np
  from moetrain.models import layout
  from moetrain.parallel import sharding
  model = setup.config.model

  def small(params, buffers):
    flat = {**layout.to_layers(params, model), **layout.to_layers(buffers, model)}
    return {name: a for name, a in flat.items() if name.endswith(('/ffn/router', 'expert_map'))}
  with jax.set_mesh(setup.mesh):
    arrays = jax.jit(small, out_shardings=sharding.replicated(setup.mesh))(params, buffers)
  return {name: np.asarray(a) for name, a in arrays.items()}


def prune(args, stats, routers, moe) -> tuple[dict, list, object]:
  """Plans the pruning of every MoE layer: -> (model.moe fields to set, lines to print, the
  edit of the flat weights)."""
  import numpy as np
  from moetrain import compress
  layers = compress.moe_layers(routers)
  lines = []
  keep = args.keep
  if keep is None:
    counts = [compress.count_for_mass(mass_E, args.min_mass) for mass_E in stats['mass']]
    keep = max(counts + [moe.top_k])
    lines.append(f'gate mass {args.min_mass}: layers need {counts} experts; every MoE layer '
                 f'keeps {keep} (the layers share one count, at least top_k={moe.top_k})')
    by = 'mass'
  else:
    by = args.by
  kept = {}
  for layer, score_E in zip(layers, stats[by]):
    kept[layer] = compress.top_experts(score_E, keep)
    lines.append(f'layer {layer}: kept experts {kept[layer].tolist()} ({by} '
                 f'{float(np.sum(score_E[kept[layer]]) / max(np.sum(score_E), 1e-30)):.1%})')

  num_experts = moe.num_experts  # before the config is changed to the kept count

  def edit(params, buffers):
    for layer, keep_N in kept.items():
      compress.prune_layer(params, buffers, layer, keep_N, num_experts)
  return {'num_experts': keep, 'skip_ratio': args.skip_ratio}, lines, edit


def merge(args, stats, routers, moe) -> tuple[dict, list, object]:
  """Plans the merging of every MoE layer: -> (model.moe fields to set, lines to print, the
  edit of the flat weights)."""
  import numpy as np
  from moetrain import compress
  outputs = moe.router_outputs or moe.num_experts
  lines, plans = [], {}
  for layer, frequency_R in zip(compress.moe_layers(routers), stats['frequency']):
    prefix = f'blocks/{layer}/ffn/'
    map_R = routers.get(prefix + 'expert_map', np.arange(outputs, dtype=np.int32))
    columns_RxD = routers[prefix + 'router'][:, :outputs].T
    # An expert's feature: the router columns of the outputs it computes, summed.
    features_ExD = np.zeros((moe.num_experts, columns_RxD.shape[1]), columns_RxD.dtype)
    np.add.at(features_ExD, map_R, columns_RxD)
    group_E = compress.cluster(compress.cosine_similarity(features_ExD), args.keep)
    plans[layer] = (group_E, compress.expert_usage(frequency_R, map_R, moe.num_experts), map_R)
    groups = [np.flatnonzero(group_E == g).tolist() for g in range(args.keep)]
    lines.append(f'layer {layer}: groups {[g for g in groups if len(g) > 1]} merged')

  def edit(params, buffers):
    for layer, (group_E, usage_E, map_R) in plans.items():
      new_map_R = compress.merge_layer(params, layer, group_E, usage_E, map_R)
      if args.keep < outputs:
        buffers[f'blocks/{layer}/ffn/expert_map'] = new_map_R
      else:
        buffers.pop(f'blocks/{layer}/ffn/expert_map', None)
  return {'num_experts': args.keep,
          'router_outputs': outputs if args.keep < outputs else 0}, lines, edit


def compressed(args, overrides, progress):
  """Reads the checkpoint, compresses it, writes OUT: -> the lines to print. The weights are
  restored, edited and saved in the shardings of the checkpoint's own mesh."""
  import jax
  from moetrain import checkpoint, config as config_lib
  from moetrain.models import layout
  from moetrain.parallel.mesh import check_layout
  from moetrain.state import make_setup
  config = checkpoint.model_config(args.checkpoint)
  _check(args, config.model.moe)
  out = checkpoint.check_new_directory(args.out_dir)
  setup, params, buffers = restored(args.checkpoint, overrides)

  def resized(fields):
    """The setup's config with `fields` of model.moe set, checked against its mesh."""
    small = setup.config.copy_and_resolve_references()
    small.model.moe.update(fields)
    check_layout(small, tuple(setup.mesh.shape.values()))  # e.g. fewer experts than ranks
    return small
  if args.keep is not None:
    resized({'num_experts': args.keep})  # before any work
  stats = calibration(setup, params, buffers, args.batches, progress)
  plan = prune if args.command == 'prune' else merge
  fields, lines, edit = plan(args, stats, _routers(setup, params, buffers), config.model.moe)
  small = resized(fields)
  config.model.moe.update(fields)
  config_lib.validate(config)
  target = make_setup(small, setup.mesh)

  def build(params, buffers):
    flat_params = layout.to_layers(params, setup.config.model)
    flat_buffers = layout.to_layers(buffers, setup.config.model)
    edit(flat_params, flat_buffers)
    return (layout.from_layers(flat_params, config.model),
            layout.from_layers(flat_buffers, config.model))
  with jax.set_mesh(setup.mesh):
    params, buffers = jax.jit(build, out_shardings=(target.state_shardings['params'],
                                                    target.state_shardings['buffers']))(
        params, buffers)
    checkpoint.save_model(out, params, buffers, config)
  return lines


def main(argv=None) -> int:
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax notes on read-only directories
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, rest = _parser().parse_known_args(argv)
    unknown = [flag for flag in rest if not flag.startswith(_OVERRIDABLE)]
    if unknown:
      raise ConfigError(f'unknown argument {unknown[0].split("=")[0]} (overrides: '
                        '--config.data.*, --config.train.* and --config.mesh.*)')
    run(args, rest)
  except ConfigError as error:
    print(f'compress_experts: error: {error}', file=sys.stderr)
    return 2
  return 0


def run(args, overrides) -> None:
  """Compresses, printing the eval loss before and after on the same batches."""
  import tqdm
  from moetrain import evaluate
  bar = None

  def progress():
    nonlocal bar
    bar = bar or tqdm.tqdm(desc='calibrate', unit='batch', total=args.batches,
                           dynamic_ncols=True)
    bar.update()

  lines = compressed(args, overrides, progress)
  if bar is not None:
    bar.close()
  print('\n'.join(lines))
  before = evaluate.evaluate(args.checkpoint, 'eval', args.eval_batches, overrides)
  after = evaluate.evaluate(args.out_dir, 'eval', args.eval_batches, overrides)
  print(f'eval loss (dropless) before {before["loss"]:.4f}, after {after["loss"]:.4f} '
        f'({after["loss"] - before["loss"]:+.4f}) over {after["tokens"]:,} tokens')
  print(f'wrote {args.out_dir}')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
