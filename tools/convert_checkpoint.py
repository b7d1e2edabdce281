"""Converts checkpoints: Hugging Face ↔ moetrain, and dense → MoE (upcycling).

  python tools/convert_checkpoint.py hf-to-moetrain HF_DIR OUT_DIR
  python tools/convert_checkpoint.py moetrain-to-hf CHECKPOINT_DIR OUT_DIR [--family F]
  python tools/convert_checkpoint.py upcycle --from DENSE_DIR[,DENSE_DIR…] \\
      --config configs/tiny.py OUT_DIR [--config.init.upcycle=granular …]

HF_DIR holds `config.json` and safetensors (one file, or shards with an index). A moetrain
checkpoint directory is a training workdir or what this tool wrote; its newest step is used.
Outputs hold weights only: train from them with `--config.init.from_checkpoint=OUT_DIR`, load
them with `moetrain.load(OUT_DIR)`. Bad input prints one line and exits with status 2, having
written nothing.
"""

import os
import pathlib
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moetrain.config import CommandParser  # noqa: E402
from moetrain.errors import ConfigError  # noqa: E402


def _parser():
  parser = CommandParser(prog='convert_checkpoint', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True, parser_class=CommandParser)
  to_ours = commands.add_parser('hf-to-moetrain', help='Hugging Face folder → moetrain',
                                description='Hugging Face safetensors → moetrain checkpoint '
                                '(Llama, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, '
                                'DeepSeek-V3; FP8 weights are dequantised to bfloat16)')
  to_ours.add_argument('hf_dir', help='folder with config.json and *.safetensors')
  to_ours.add_argument('out_dir', help='new moetrain checkpoint directory')
  to_hf = commands.add_parser('moetrain-to-hf', help='moetrain checkpoint → Hugging Face',
                              description='moetrain checkpoint → Hugging Face safetensors '
                              'folder that transformers loads')
  to_hf.add_argument('checkpoint_dir', help='training workdir or converted checkpoint')
  to_hf.add_argument('out_dir', help='new Hugging Face folder')
  to_hf.add_argument('--family', default='', help='Hugging Face model_type to write '
                     '(default: the one that expresses the config)')
  to_hf.add_argument('--max-shard-gb', type=float, default=5.0,
                     help='largest safetensors shard, in GiB (default 5)')
  up = commands.add_parser('upcycle', help='dense checkpoint(s) → MoE checkpoint',
                           description='Upcycles dense moetrain checkpoints into the MoE model '
                           'of --config (copy, drop or granular: --config.init.upcycle)')
  up.add_argument('--from', dest='sources', required=True,
                  help='dense checkpoint directory, or several comma-separated (one per '
                  'expert group, Branch-Train-MiX)')
  up.add_argument('--config', required=True, help='the MoE model: a configs/*.py file')
  up.add_argument('out_dir', help='new moetrain checkpoint directory')
  return parser


class _Bar:
  """A progress bar that appears with the first finished step, so that a refusal found
  before any work prints nothing but its one line."""

  def __init__(self, desc: str, unit: str = 'tensor'):
    self.desc, self.unit, self.bar = desc, unit, None

  def __call__(self, _=None):
    if self.bar is None:
      import tqdm
      self.bar = tqdm.tqdm(desc=self.desc, unit=self.unit, dynamic_ncols=True)
    self.bar.update()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self.bar is not None:
      self.bar.close()


def hf_to_moetrain(args):
  from moetrain.convert import hf
  with _Bar('convert') as bar:
    config = hf.hf_to_moetrain(args.hf_dir, args.out_dir, progress=bar)
  print(f'wrote {args.out_dir}: {config.model.num_layers} layers, '
        f'{config.model.moe.num_experts or "no"} experts')


def moetrain_to_hf(args):
  from moetrain.convert import hf
  with _Bar('convert') as bar:
    family = hf.moetrain_to_hf(args.checkpoint_dir, args.out_dir, family_name=args.family,
                               max_shard_bytes=int(args.max_shard_gb * 2**30), progress=bar)
  print(f'wrote {args.out_dir} as {family.architecture}')


def upcycle(args, overrides):
  import jax
  from moetrain import checkpoint, config as config_lib, warm_start
  from moetrain.parallel.mesh import make_mesh
  from moetrain.state import make_setup
  config = config_lib.load(args.config, [*overrides,
                                         f'--config.init.upcycle_from={args.sources}'])
  out = checkpoint.check_new_directory(args.out_dir)
  mesh = make_mesh(config)
  setup = make_setup(config, mesh)
  with jax.set_mesh(mesh), _Bar('upcycle', unit='stage') as bar:
    params, buffers = warm_start.upcycled_weights(setup)
    bar()
    checkpoint.save_model(out, params, buffers, config)
    bar()
  print(f'wrote {out}: {config.init.upcycle} upcycling of {args.sources} into '
        f'{config.model.moe.num_experts} experts')


def main(argv=None) -> int:
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax notes on read-only directories
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, rest = _parser().parse_known_args(argv)
    unknown = [flag for flag in rest
               if args.command != 'upcycle' or not flag.startswith('--config.')]
    if unknown:
      raise ConfigError(f'unknown argument {unknown[0].split("=")[0]}')
    if args.command == 'hf-to-moetrain':
      hf_to_moetrain(args)
    elif args.command == 'moetrain-to-hf':
      moetrain_to_hf(args)
    else:
      upcycle(args, rest)
  except ConfigError as error:
    print(f'convert_checkpoint: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
