"""The `train`, `model` and `fp8-curves` modes of tools/benchmark.py: a config's whole train
step, run here (`train`) or compiled for a target mesh and modelled (`model`,
`moetrain.cost_model`), and its loss curve under each `model.fp8` recipe (`fp8-curves`)."""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from moetrain import config as config_lib
from moetrain import cost_model, hardware, pipeline_model, stage_cost, summary, trainer
from moetrain.errors import ConfigError
from moetrain.models import fp8 as fp8_lib
from moetrain.parallel.mesh import AXES, make_mesh, mesh_shape
from moetrain.state import init_state, make_setup
from moetrain.steps import make_train_step


def random_batch(config) -> dict:
  """Random tokens of one global batch of `config` (inputs and next-token targets)."""
  t = config.train
  tokens = np.random.default_rng(0).integers(4, config.model.vocab_size,
                                             (t.batch_size, t.seq_len + 1))
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32)}


def measure_train_step(config, repeats: int) -> dict:
  """Compile seconds and median step seconds of `config`'s train step on this machine."""
  setup = make_setup(config, make_mesh(config))
  with jax.set_mesh(setup.mesh):
    state = init_state(setup)
    batch = trainer.global_batch(setup, random_batch(config))
    start = time.perf_counter()
    step = make_train_step(setup).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    seconds = []
    for index in range(repeats + 2):  # the first two warm up
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      if index >= 2:
        seconds.append(time.perf_counter() - start)
  return {'compile_s': compile_seconds, 'step_s': statistics.median(seconds)}


def train(args) -> None:
  config = config_lib.load(args.config, args.overrides)
  m, t = config.model, config.train
  device = jax.devices()[0]
  chip = hardware.chip_for_device(device.device_kind)
  flops_per_token = summary.flops_per_token(m, t.seq_len)
  measured = measure_train_step(config, args.repeats)
  tokens_per_s = t.batch_size * t.seq_len / measured['step_s']
  achieved = tokens_per_s * flops_per_token / jax.device_count()
  report = {'config': args.config, 'overrides': args.overrides, 'platform': device.platform,
            'device': device.device_kind, 'devices': jax.device_count(),
            'dtype': m.dtype, 'remat': t.remat, 'dispatch': m.moe.dispatch, **measured,
            'tokens_per_s': tokens_per_s, 'flops_per_token': flops_per_token,
            'model_flops_per_s_per_device': achieved,
            'mfu': achieved / chip.peak_flops if chip else None}
  print(f'{args.config} on {jax.device_count()} × {device.device_kind} ({m.dtype}, remat '
        f'{t.remat}, dispatch {m.moe.dispatch}), median of {args.repeats} steps')
  print(f'  compile          {measured["compile_s"]:10.1f} s')
  print(f'  step             {1e3 * measured["step_s"]:10.1f} ms')
  print(f'  tokens/s         {tokens_per_s:10,.0f}')
  print(f'  FLOPs per token  {flops_per_token:10.3g} (6·active weights + attention)')
  print(f'  model FLOP/s     {achieved:10.3g} per device')
  mfu = 'n/a (no known peak for this device)' if chip is None else f'{100 * report["mfu"]:9.1f}%'
  print(f'  MFU              {mfu}')
  _write(args.json, report)


def _with_mesh(config, spec: str):
  for item in filter(None, (spec or '').split(',')):
    axis, _, size = item.partition('=')
    if axis not in config.mesh:
      raise ConfigError(f'--mesh: unknown axis {axis!r} (axes: '
                        f'{", ".join(config.mesh)})')
    if not size.isdigit() or not int(size):
      raise ConfigError(f'--mesh: {axis}={size} must be a positive integer')
    config.mesh[axis] = int(size)
  return config


def cpu_devices_needed(args) -> int:
  config = _with_mesh(config_lib.load(args.config, args.overrides), args.mesh)
  sizes = [config.mesh[axis] for axis in config.mesh]
  if args.devices:
    return args.devices
  if -1 in sizes:
    raise ConfigError(f'--devices is needed: the mesh of {args.config} has an '
                      'axis of size -1')
  return int(np.prod(sizes))


def ensure_cpu_devices(count: int) -> None:
  """Restarts this process with `count` CPU devices unless it has them (XLA reads the flag
  once, before its first use)."""
  if jax.default_backend() == 'cpu' and jax.device_count() == count:
    return
  flags = os.environ.get('XLA_FLAGS', '').split()
  flags = [f for f in flags if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={count}']))
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def model(args) -> None:
  devices = cpu_devices_needed(args)
  ensure_cpu_devices(devices)
  config = _with_mesh(config_lib.load(args.config, args.overrides), args.mesh)
  if args.pick_stages:
    _pick_stages(args, config, devices)
    return
  config.mesh.update(dict(zip(AXES, mesh_shape(config.mesh, devices))))
  stages = config.mesh.stage
  print(f'{args.config}: compiling the train step for {devices // stages} CPU devices '
        f'standing in for {"one stage of " if stages > 1 else ""}the target …', flush=True)
  cost = (pipeline_model.pipelined_cost(config, devices) if stages > 1 else
          cost_model.step_cost(config, jax.devices()[:devices]))
  hand = cost_model.hand_flops(config)
  rows = [cost_model.roofline(cost, hand['model'], hardware.CHIPS[name]) for name in args.chips]
  mesh = ' '.join(f'{a}={s}' for a, s in cost.mesh.items())
  memory, estimate = cost.xla_memory, cost.estimated_memory
  gib = lambda value: f'{value / 2**30:.1f} GiB'
  print(f'mesh {mesh}; compiled in {cost.compile_seconds:.0f} s; {cost.tokens:,} tokens per '
        f'step; model FLOPs {hand["model"]:.3g} per step (6·active weights·tokens + attention)')
  if stages > 1:
    _print_pipeline(config, cost, args.chips)
  print('per device and step:')
  print(f'  FLOPs            {cost.flops:.3g} (XLA cost analysis {cost.xla_flops:.3g} with loop '
        f'bodies once; × devices / hand count of hardware FLOPs = '
        f'{cost_model.flops_ratio(cost, hand):.3f}'
        f'{"; the bubble computes on placeholders" if stages > 1 else ""})')
  print(f'  bytes accessed   {cost.bytes_accessed:.3g} by XLA:CPU (with loop trips; XLA counts '
        f'{cost.xla_bytes_accessed:.3g}); an accelerator moves at least '
        f'{cost.minimum_traffic:.3g}')
  for kind, sent in sorted(cost.collective_bytes.items()):
    print(f'  {kind:<16} {gib(sent)} sent (groups of up to {cost.collective_groups[kind]})')
  print(f'  memory (XLA:CPU) peak {gib(memory["peak"])}: arguments {gib(memory["argument"])}, '
        f'temporaries {gib(memory["temp"])} (float32 dot temporaries on CPU'
        f'{"; one stage, one microbatch, no pipeline" if stages > 1 else ""})')
  print(f'  memory estimate  {gib(estimate["total"])} = params {gib(estimate["params"])} + '
        f'optimizer {gib(estimate["optimizer"])} + activations {gib(estimate["activations"])}'
        f'{" (one stage)" if stages > 1 else ""}')
  header = (f'{"chip":<24} {"step s":>8} {"overlap s":>9} {"MFU":>6} {"tokens/s":>12} '
            f'{"compute s":>9} {"HBM s":>7} {"comm s":>7} {"exposed s":>9} fits')
  print(header)
  print('-' * len(header))
  for row in rows:
    print(f'{row["chip"]:<24} {row["step_s"]:8.3f} {row["overlapped_step_s"]:9.3f} '
          f'{100 * row["mfu"]:5.1f}% {row["tokens_per_s"]:12,.0f} {row["compute_s"]:9.3f} '
          f'{row["memory_s"]:7.3f} {sum(row["collective_s"].values()):7.3f} '
          f'{row["exposed_comm_s"]:9.3f} {"yes" if row["fits"] else "NO"}')
  exchanges = {name: _print_exchange(cost, hardware.CHIPS[name]) for name in args.chips}
  fp8 = _print_fp8(config, devices, args.chips, hand) if args.fp8 else None
  _write(args.json, {'config': args.config, 'overrides': args.overrides, 'mesh': cost.mesh,
                     'hand_flops': hand, **{k: v for k, v in vars(cost).items() if k != 'mesh'},
                     'roofline': rows, 'exchange_variants': exchanges, 'fp8': fp8})


# (model.fp8, model.moe.exchange_dtype) of the rows `--fp8` compares.
FP8_ROWS = (('none', ''), ('tensorwise', ''), ('blockwise', ''), ('blockwise', 'float8_e4m3fn'))


def _print_fp8(config, devices: int, chips, hand) -> dict:
  """The step modelled in bf16 and under each FP8 recipe (`moetrain/fp8_cost.py`), from the
  one compiled stand-in: step time, compute, exposed communication, all-gathers, memory."""
  print('FP8 (model.fp8; FP8 dispatch: model.moe.exchange_dtype=float8_e4m3fn), modelled from '
        'the bf16 step:')
  print(f'  {"chip":<24} {"matmuls":<10} {"dispatch":<8} {"FP8 FLOPs":>9} {"step s":>8} '
        f'{"× bf16":>6} {"compute s":>9} {"exposed s":>9} {"gathers GiB":>11} '
        f'{"memory GiB":>10} fits')
  report, bf16 = {}, {}
  for recipe, dispatch in FP8_ROWS:
    variant = config.copy_and_resolve_references()
    variant.model.fp8, variant.model.moe.exchange_dtype = recipe, dispatch
    cost = (pipeline_model.pipelined_cost(variant, devices) if config.mesh.stage > 1 else
            cost_model.step_cost(variant, jax.devices()[:devices]))
    for name in chips:
      row = cost_model.roofline(cost, hand['model'], hardware.CHIPS[name])
      bf16.setdefault(name, row['step_s'])
      report[f'{name} {recipe} {dispatch or "bf16"}'] = {**row, 'fp8_fraction': cost.fp8_fraction}
      print(f'  {row["chip"]:<24} {recipe:<10} {"fp8" if dispatch else "bf16":<8} '
            f'{cost.fp8_fraction:9.1%} {row["step_s"]:8.3f} {row["step_s"] / bf16[name]:6.2f} '
            f'{row["compute_s"]:9.3f} {row["exposed_comm_s"]:9.3f} '
            f'{cost.collective_bytes.get("all-gather", 0) / 2**30:11.1f} '
            f'{cost.estimated_memory["total"] / 2**30:10.1f} {"yes" if row["fits"] else "NO"}')
  return report


def fp8_curves(args) -> None:
  """Trains the config for `--steps` steps under each `model.fp8` recipe (same seed, same data,
  every step logged) and prints the losses at `--at` steps and each recipe's largest relative
  difference from the 'none' run over all steps, one by one and of 10-step means."""
  losses = {}
  with tempfile.TemporaryDirectory() as scratch:
    for recipe in fp8_lib.RECIPES:
      workdir = pathlib.Path(scratch) / recipe
      start = time.perf_counter()
      result = subprocess.run(
          [sys.executable, '-m', 'moetrain.train', '--config', args.config, '--workdir',
           str(workdir), *args.overrides, f'--config.model.fp8={recipe}',
           f'--config.train.steps={args.steps}', '--config.train.log_every=1',
           '--config.train.eval_every=0', '--config.train.sample_tokens=0',
           '--config.train.checkpoint_every=0'], capture_output=True, text=True, check=False)
      if result.returncode:
        raise ConfigError(f'model.fp8={recipe}: moetrain.train failed: '
                          f'{(result.stderr.strip().splitlines() or ["?"])[-1]}')
      lines = (workdir / 'metrics.jsonl').read_text().splitlines()
      records = [json.loads(line) for line in lines if line]
      losses[recipe] = {r['step']: r['loss'] for r in records if 'split' not in r}
      print(f'model.fp8={recipe}: {args.steps} steps in {time.perf_counter() - start:.0f} s',
            flush=True)
  report = loss_table(losses, args.at or [1] + [args.steps * i // 4 for i in range(1, 5)])
  _write(args.json, {'config': args.config, 'overrides': args.overrides, 'losses': losses,
                     'max_relative_difference_per_step_and_of_10_step_means': report})


def loss_table(losses: dict, at: list, window: int = 10) -> dict:
  """Prints a markdown table of `losses` (recipe → step → loss) at the steps `at`, with each
  recipe's largest |loss / loss of 'none' − 1| over their common steps, one by one and as means
  of `window` consecutive steps; returns those two per recipe."""
  reference = losses[fp8_lib.NONE]
  differences = {}
  print('| model.fp8 | ' + ' | '.join(f'step {step}' for step in at)
        + f' | max relative difference from none, per step (step) | of {window}-step means |')
  print('| --- ' * (len(at) + 3) + '|')
  for recipe, curve in losses.items():
    steps = sorted(set(curve) & set(reference))
    step = max(steps, key=lambda i: abs(curve[i] / reference[i] - 1))
    windows = [steps[i:i + window] for i in range(0, len(steps) - window + 1, window)]
    means = [abs(sum(curve[i] for i in w) / sum(reference[i] for i in w) - 1) for w in windows]
    differences[recipe] = (abs(curve[step] / reference[step] - 1), max(means, default=0.0))
    print(f'| {recipe} | ' + ' | '.join(f'{curve[i]:.4f}' for i in at)
          + f' | {differences[recipe][0]:.2%} ({step}) | {differences[recipe][1]:.2%} |')
  return differences


def _print_pipeline(config, cost, chips) -> None:
  """The schedule, the bytes over the stage axis and one stage's activations."""
  mib = lambda value: f'{value / 2**20:.1f} MiB'
  links = ', '.join(f'{hardware.CHIPS[name].link_names[cost.stage_link[size] == "inter"]} on '
                    f'{name}' for name in chips
                    for size in [hardware.CHIPS[name].node_size])
  print(stage_cost.describe(config, cost.mesh) + f', {mib(cost.stage_bytes["gradients"])} '
        f'reducing the gradients of the weights outside the stack (over {links})')
  per_layer = summary.layer_token_bytes(config, cost.mesh['tensor'])
  parts = stage_cost.pipeline_activations(config, cost.mesh, per_layer,
                                          config.model.vocab_size * 8)
  print('one stage keeps activations of ' + ', '.join(
      f'{name} {value / 2**30:.1f} GiB' for name, value in parts.items()))


def _pick_stages(args, config, devices: int) -> None:
  """Every stage count the config can run with on `devices`, and the one each chip needs."""
  print(f'{args.config}: stage counts for {devices} devices, each compiled on CPU stand-ins '
        '…', flush=True)
  rows = pipeline_model.stage_cost_rows(config, devices, args.chips)
  gib = lambda value: f'{value / 2**30:6.1f}'
  for chip in args.chips:
    print(hardware.CHIPS[chip].name)
    print(f'  {"stages":>6} {"micro":>5} {"mesh":<36} {"bubble":>6} {"memory GiB":>10} '
          f'{"step s":>8} {"compute s":>9} {"exposed s":>9} {"of compute":>10} {"MFU":>6} fits')
    for row in rows:
      cost, line = row['cost'], row['roofline'][chip]
      mesh = ' '.join(f'{a}={s}' for a, s in cost.mesh.items() if a != 'stage')
      bubble = getattr(cost, 'bubble', 0.0)
      print(f'  {row["stages"]:6d} {row["microbatches"]:5d} {mesh:<36} {bubble:6.1%} '
            f'{gib(cost.estimated_memory["total"])}     {line["step_s"]:8.3f} '
            f'{line["compute_s"]:9.3f} {line["exposed_comm_s"]:9.3f} '
            f'{line["exposed_comm_s"] / line["compute_s"]:10.1%} {100 * line["mfu"]:5.1f}% '
            f'{"yes" if line["fits"] else "NO"}')
    fewest = pipeline_model.pick_stages(rows, chip)
    fastest = pipeline_model.pick_stages(rows, chip, by='time')
    print('  picked: ' + ('none fits' if fewest is None else
                          f'{fewest["stages"]} (fewest that fit), {fastest["stages"]} (fastest '
                          'that fits)'))
  _write(args.json, {'config': args.config, 'overrides': args.overrides, 'devices': devices,
                     'rows': [{**row, 'cost': vars(row['cost'])} for row in rows]})


def _print_exchange(cost, chip) -> list:
  """Bytes per link class and exposed communication of each way to run the exchange."""
  variants = cost_model.exchange_variants(cost, chip)
  if not variants:
    return variants
  intra, inter = chip.link_names
  gb = lambda value: f'{value / 2**30:10.1f}'
  others = {link: sum(sent[link] for role, sent in cost.link_bytes[chip.node_size].items()
                      if role != 'exchange') for link in hardware.LINKS}
  print(f'{chip.name}, {chip.node_size} per node ({intra} {chip.link_bandwidth / 1e9:.0f} GB/s, '
        f'{inter} {chip.network_bandwidth / 1e9:.0f} GB/s per chip); the expert exchange spans '
        f'{variants[0]["nodes"]} node(s); the other collectives send {intra} '
        f'{others["intra"] / 2**30:.1f} GiB, {inter} {others["inter"] / 2**30:.1f} GiB '
        '(not overlapped)')
  header = (f'  {"exchange":<15} {"chunks":>6} {intra + " GiB":>10} {inter + " GiB":>10} '
            f'{"link s":>8} {"exposed s":>9} {"comm exposed s":>14} {"step s":>8} {"of step":>7}')
  print(header)
  for row in variants:
    print(f'  {row["variant"]:<15} {row["chunks"]:6d} {gb(row["bytes"]["intra"])} '
          f'{gb(row["bytes"]["inter"])} {row["link_s"]:8.3f} {row["exposed_s"]:9.3f} '
          f'{row["exposed_comm_s"]:14.3f} {row["step_s"]:8.3f} '
          f'{100 * row["exposed_comm_s"] / row["step_s"]:6.1f}%')
  return variants


def _write(path, report) -> None:
  if path:
    pathlib.Path(path).write_text(json.dumps(report, indent=2, default=str) + '\n')


def add_parsers(commands) -> None:
  """Adds the `train` and `model` subcommands to benchmark.py's parser."""
  run = commands.add_parser('train', help="a config's train step: compile, step time, MFU")
  run.add_argument('--config', default='configs/tiny.py')
  run.add_argument('--repeats', type=int, default=10)
  run.add_argument('--json', help='also write the results to this JSON file')
  run.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  run.set_defaults(run=train)
  plan = commands.add_parser('model', help='compile for a target mesh; FLOPs, bytes, '
                             'collectives, memory and a roofline per chip')
  plan.add_argument('--config', required=True)
  plan.add_argument('--mesh', default='', help='axis sizes, e.g. expert=8,fsdp=16')
  plan.add_argument('--devices', type=int, default=0,
                    help='number of devices (needed when a mesh axis is -1)')
  plan.add_argument('--chips', nargs='+', choices=sorted(hardware.CHIPS),
                    default=['h100', 'tpu-v5p'])
  plan.add_argument('--pick-stages', action='store_true',
                    help='model every pipeline stage count the config can run with on these '
                    'devices and pick the fewest that fit each chip')
  plan.add_argument('--fp8', action='store_true',
                    help='also model the step in bf16 and under each model.fp8 recipe')
  plan.add_argument('--json', help='also write the results to this JSON file')
  plan.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  plan.set_defaults(run=model)
  curves = commands.add_parser('fp8-curves', help="a config's loss curve under each model.fp8 "
                               'recipe (trains it once per recipe)')
  curves.add_argument('--config', default='configs/tiny.py')
  curves.add_argument('--steps', type=int, default=200)
  curves.add_argument('--at', type=int, nargs='+', help='steps to show (default: 1 and every '
                      'quarter)')
  curves.add_argument('--json', help='also write the results to this JSON file')
  curves.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  curves.set_defaults(run=fp8_curves)
