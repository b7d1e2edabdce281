"""Prunes or merges the routed experts of a moetrain checkpoint (docs/compress.md).

  python tools/compress_experts.py prune CHECKPOINT OUT --keep N [--by frequency|mass]
  python tools/compress_experts.py prune CHECKPOINT OUT --min-mass F [--skip-ratio B]
  python tools/compress_experts.py merge CHECKPOINT OUT --keep N [--similarity router]

Every MoE layer keeps N experts (its layers share one count), chosen from that layer's routing
statistics on `--batches` calibration batches of the checkpoint's train split; `--config.data.*`
(and `--config.train.*`) overrides pick any other data. The eval loss is printed before and
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

_OVERRIDABLE = ('--config.data.', '--config.train.')


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


def calibration(model, config, num_batches: int, progress=None) -> dict:
  """Per MoE layer and router output over `num_batches` train batches (padding excluded):
  {'frequency' [N, R] (share of the layer's assignments), 'mass' [N, R] (gate mass)}."""
  import jax
  import numpy as np
  from flax import nnx
  from moetrain import steps
  from moetrain.data.inputs import fixed_batches, load_tokenizer
  graphdef, state = nnx.split(model)

  @jax.jit
  def routing_sums(state, batch):
    _, _, stats, _ = steps.forward(nnx.merge(graphdef, state), batch, 0.0,
                                   document_mask=config.train.document_mask)
    return stats.assignments_E, stats.gate_mass_E

  batches = fixed_batches(config, load_tokenizer(config), 'train', num_batches,
                          range(config.train.batch_size))
  load, mass = 0.0, 0.0
  for batch in batches:
    batch_load, batch_mass = routing_sums(state, batch)
    load, mass = load + np.asarray(batch_load), mass + np.asarray(batch_mass)
    if progress:
      progress()
  return {'frequency': load / np.maximum(load.sum(-1, keepdims=True), 1.0), 'mass': mass}


def _weights(model, model_config):
  """(flat per-layer params, buffers) of `model` as numpy arrays."""
  import jax
  import numpy as np
  from flax import nnx
  from moetrain.models import layout
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  host = lambda tree: jax.tree.map(np.asarray, nnx.to_pure_dict(tree))
  return (layout.to_layers(host(params), model_config),
          layout.to_layers(host(buffers), model_config))


def prune(args, stats, params, buffers, moe) -> tuple[dict, list]:
  """Prunes every MoE layer in place: -> (model.moe fields to set, lines to print)."""
  import numpy as np
  from moetrain import compress
  layers = compress.moe_layers(params)
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
  for layer, score_E in zip(layers, stats[by]):
    keep_N = compress.top_experts(score_E, keep)
    compress.prune_layer(params, buffers, layer, keep_N, moe.num_experts)
    lines.append(f'layer {layer}: kept experts {keep_N.tolist()} ({by} '
                 f'{float(np.sum(score_E[keep_N]) / max(np.sum(score_E), 1e-30)):.1%})')
  return {'num_experts': keep, 'skip_ratio': args.skip_ratio}, lines


def merge(args, stats, params, buffers, moe) -> tuple[dict, list]:
  """Merges every MoE layer in place: -> (model.moe fields to set, lines to print)."""
  import numpy as np
  from moetrain import compress
  outputs = moe.router_outputs or moe.num_experts
  lines = []
  for layer, frequency_R in zip(compress.moe_layers(params), stats['frequency']):
    prefix = f'blocks/{layer}/ffn/'
    map_R = buffers.get(prefix + 'expert_map', np.arange(outputs, dtype=np.int32))
    columns_RxD = params[prefix + 'router'][:, :outputs].T
    # An expert's feature: the router columns of the outputs it computes, summed.
    features_ExD = np.stack([columns_RxD[map_R == e].sum(0) for e in range(moe.num_experts)])
    group_E = compress.cluster(compress.cosine_similarity(features_ExD), args.keep)
    usage_E = compress.expert_usage(frequency_R, map_R, moe.num_experts)
    new_map_R = compress.merge_layer(params, layer, group_E, usage_E, map_R)
    if args.keep < outputs:
      buffers[prefix + 'expert_map'] = new_map_R
    else:
      buffers.pop(prefix + 'expert_map', None)
    groups = [np.flatnonzero(group_E == g).tolist() for g in range(args.keep)]
    lines.append(f'layer {layer}: groups {[g for g in groups if len(g) > 1]} merged')
  return {'num_experts': args.keep,
          'router_outputs': outputs if args.keep < outputs else 0}, lines


def compressed(args, overrides, progress):
  """Reads the checkpoint, compresses it, writes OUT: -> the lines to print."""
  from moetrain import checkpoint, config as config_lib, pretrained
  from moetrain.models import layout
  config = checkpoint.model_config(args.checkpoint)
  _check(args, config.model.moe)
  out = checkpoint.check_new_directory(args.out_dir)
  model, _ = pretrained.load(args.checkpoint)
  calibrated = config_lib.with_overrides(config.copy_and_resolve_references(), overrides)
  stats = calibration(model, calibrated, args.batches, progress)
  params, buffers = _weights(model, config.model)
  compress_layers = prune if args.command == 'prune' else merge
  fields, lines = compress_layers(args, stats, params, buffers, config.model.moe)
  for name, value in fields.items():
    config.model.moe[name] = value
  config_lib.validate(config)
  checkpoint.save_model(out, layout.from_layers(params, config.model),
                        layout.from_layers(buffers, config.model), config)
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
                        '--config.data.* and --config.train.*)')
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
