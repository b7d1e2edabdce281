"""moetrain benchmarks.

  python tools/benchmark.py moe-layer [--shapes small|full] [--json out.json]
  python tools/benchmark.py checkpoint [--config configs/tiny.py] [--json out.json]
  python tools/benchmark.py convert [--config configs/tiny_mixtral.py] [--config.a.b=v …]
  python tools/benchmark.py input [--config configs/tiny.py] [--workers 0 1 2]
  python tools/benchmark.py train [--config configs/tiny.py] [--config.a.b=v …]
  python tools/benchmark.py model --config configs/mixtral_8x7b.py [--devices 8]
      [--mesh expert=8,fsdp=1] [--chips h100 tpu-v5p] [--pick-stages] [--fp8] [--config.a.b=v …]
  python tools/benchmark.py fp8-curves [--config configs/tiny.py] [--steps 200] [--config.a.b=v …]
  python tools/benchmark.py bam [--seed-steps 100] [--branch-steps 100] [--steps 50] [--config.a.b=v …]

moe-layer: the train step (forward + backward) of one MoE feed-forward layer for each way of
computing it (the capacity buffers' two backends at --capacity-factor, and dropless), next to a dense SwiGLU FFN with the same active FLOPs (hidden width k·d_expert;
a shared expert, where the shape has one, is added to both), timed side by side in one process.
The ratio MoE / dense is the overhead docs/performance.md sets targets for (1.0: no overhead).
Absolute times move from machine to machine; compare ratios from one run.

checkpoint: train steps of a config timed alone and while an asynchronous Orbax save of the
whole train state is in flight, plus how long `save` blocks the loop and how long the save
takes to land.

input: tokens/s of the document pipeline (read jsonl, tokenize on worker threads, pack, batch)
on the embedded corpus written out as jsonl, for several worker counts, next to the tokens/s
the config's train step consumes on this machine: the pipeline must outpace the step.

train: the config's whole train step on this machine: compile time, step time, tokens/s,
training FLOPs per token counted from the config (attention included), and MFU where the
device's peak is known (`moetrain.hardware`).

model: the config's train step lowered and compiled for a mesh of CPU devices standing in for
the target's (nothing big runs), read back with XLA's cost and memory analysis and its
optimized HLO (`moetrain.cost_model`): FLOPs (loop trips counted), bytes accessed, bytes each
device sends per collective kind, peak memory per device, and a roofline estimate of step time
and MFU per chip; then, per chip, the bytes each device sends inside its node and across nodes
and the communication left exposed with the expert exchange run flat, overlapped in chunks,
two-level, in FP8 and all combined (`tools/exchange_compare.py` times those on accelerators).
With pipeline stages (`--mesh stage=S`) it compiles one stage on N/S devices and models the
pipeline (`moetrain.pipeline_model`): bubble, bytes sent between stages, one stage's memory.
`--pick-stages` models every stage count the config can run with and picks one per chip.
`--fp8` adds the step in bf16 and under each `model.fp8` recipe, modelled from the one compiled
bf16 step (`moetrain.fp8_cost`): FP8 matmuls at the chip's FP8 peak, expert weights gathered
over FSDP in FP8, and FP8 dispatch.

fp8-curves: the config trained for --steps steps once per `model.fp8` recipe (same seed and
data, in child processes) and its losses side by side: at --at steps, and each recipe's largest
relative difference from the bf16 run over all steps, one by one and of 10-step means, as a
markdown table.

bam: two dense branches of one seed model, trained on different data, upcycled into one MoE
with averaged attention or with attention experts (BAM, docs/upcycle.md) and trained alike;
their first and last losses side by side.

convert: a synthetic Hugging Face checkpoint of the config's model (random weights) converted
to moetrain and back by `tools/convert_checkpoint.py` in child processes; prints the checkpoint
size, each direction's time and peak resident memory, also relative to a process that only
imports the same libraries. Tensors are read and written one at a time; Orbax's save of the
converted weights still holds a second copy of them while it writes.
"""

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import numpy as np  # noqa: E402

from moetrain import checkpoint, exchange_model, trainer  # noqa: E402
from moetrain import config as config_lib  # noqa: E402
from moetrain.errors import ConfigError  # noqa: E402
from moetrain.models import dispatch, routing  # noqa: E402
from moetrain.models import pipeline as moe_pipeline  # noqa: E402
from moetrain.parallel.mesh import make_mesh  # noqa: E402
from moetrain.models.mlp import swiglu  # noqa: E402
from moetrain.state import init_state, make_setup  # noqa: E402
from moetrain.steps import make_train_step  # noqa: E402

import bam_benchmark  # noqa: E402
import step_benchmarks  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LayerShape:
  name: str
  d_model: int
  d_expert: int
  num_experts: int
  top_k: int
  sequences: int  # one dispatch group each
  seq_len: int
  d_shared: int = 0  # hidden width of a shared expert; 0: none


# `small` fits a 2-core CPU in about two minutes; `full` are docs/performance.md's GPU shapes.
SHAPES = {
    'small': (
        LayerShape('E8 top-2', 256, 512, 8, 2, 8, 512),
        LayerShape('E64 top-8 + shared', 256, 64, 64, 8, 8, 512, d_shared=64),
    ),
    'full': (
        LayerShape('E8 top-2 d2048 (Mixtral-like)', 2048, 5632, 8, 2, 4, 4096),
        LayerShape('E8 top-2 d1024', 1024, 2816, 8, 2, 4, 4096),
        LayerShape('E64 top-8 f1408 + shared (OLMoE/DeepSeek-like)', 2048, 1408, 64, 8, 4, 4096,
                   d_shared=1408),
    ),
}
DTYPES = {'small': jnp.float32, 'full': jnp.bfloat16}


def _normal(key, shape, fan_in, dtype):
  return (jax.random.normal(key, shape, jnp.float32) / fan_in**0.5).astype(dtype)


def _shared_params(shape, keys, dtype):
  d, f = shape.d_model, shape.d_shared
  if not f:
    return ()
  return (_normal(keys[0], (d, f), d, dtype), _normal(keys[1], (d, f), d, dtype),
          _normal(keys[2], (f, d), f, dtype))


def _with_shared(y_GxTxD, x_GxTxD, shared):
  return y_GxTxD + swiglu(x_GxTxD, *shared) if shared else y_GxTxD


# The capacity buffers' backends (`dispatch`), and dropless: sorted rows, grouped matmuls.
LAYER_BACKENDS = (*dispatch.BACKENDS, 'dropless')


def layer_steps(shape, dtype, backends, capacity_factor, min_capacity):
  """Jitted train steps of the dense FFN and of the MoE layer per backend, with their inputs."""
  d, f, e, k = shape.d_model, shape.d_expert, shape.num_experts, shape.top_k
  keys = jax.random.split(jax.random.key(0), 11)
  x_GxTxD = jax.random.normal(keys[0], (shape.sequences, shape.seq_len, d), jnp.float32)
  x_GxTxD = x_GxTxD.astype(dtype)
  shared = _shared_params(shape, keys[1:4], dtype)
  dense = (_normal(keys[4], (d, k * f), d, dtype), _normal(keys[5], (d, k * f), d, dtype),
           _normal(keys[6], (k * f, d), k * f, dtype), *shared)
  moe = (_normal(keys[7], (d, e), d, jnp.float32), _normal(keys[8], (e, d, f), d, dtype),
         _normal(keys[9], (e, d, f), d, dtype), _normal(keys[10], (e, f, d), f, dtype), *shared)
  mask_GxT = jnp.ones(x_GxTxD.shape[:2], jnp.float32)
  capacity = routing.expert_capacity(shape.seq_len, k, e, capacity_factor, min_capacity)

  def dense_loss(x_GxTxD, params):
    y_GxTxD = swiglu(x_GxTxD, *params[:3])
    return jnp.sum(_with_shared(y_GxTxD, x_GxTxD, params[3:]).astype(jnp.float32))

  def moe_loss(x_GxTxD, params, *, backend):
    router_DxE, w_gate, w_up, w_down = params[:4]
    logits_GxTxE = jnp.einsum('gtd,de->gte', x_GxTxD.astype(jnp.float32), router_DxE)
    weights_GxTxK, experts_GxTxK = routing.top_k_gates(
        routing.router_probabilities(logits_GxTxE), k, True)
    y_GxTxD, _ = moe_pipeline.token_choice(
        x_GxTxD, experts_GxTxK, weights_GxTxK, mask_GxT, (w_gate, w_up, w_down), num_experts=e,
        capacity=None if backend == 'dropless' else capacity, backend=backend)
    return jnp.sum(_with_shared(y_GxTxD, x_GxTxD, params[4:]).astype(jnp.float32))

  train_step = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))
  steps = {'dense': (train_step(dense_loss), (x_GxTxD, dense))}
  for backend in backends:
    steps[backend] = (train_step(functools.partial(moe_loss, backend=backend)), (x_GxTxD, moe))
  return steps, capacity


def time_steps(steps, repeats):
  """Median seconds per call of each step; calls interleaved, so drift hits all alike."""
  for step, args in steps.values():  # compile and warm up, not timed
    jax.block_until_ready(step(*args))
  seconds = {name: [] for name in steps}
  for _ in range(repeats):
    for name, (step, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in seconds.items()}


def moe_layer(args):
  device = jax.devices()[0]
  dtype = DTYPES[args.shapes]
  print(f'platform {device.platform}, device {device.device_kind} (x{jax.device_count()}), '
        f'jax {jax.__version__}, {jnp.dtype(dtype).name}, capacity factor '
        f'{args.capacity_factor}, median of {args.repeats}', flush=True)
  rows = []
  header = f'{"shape":<48} {"backend":<9} {"ms MoE":>9} {"ms dense":>9} {"ratio":>6}'
  print(header)
  print('-' * len(header))
  for shape in SHAPES[args.shapes]:
    steps, capacity = layer_steps(shape, dtype, args.backends, args.capacity_factor,
                                  args.min_capacity)
    seconds = time_steps(steps, args.repeats)
    for backend in args.backends:
      ms_moe, ms_dense = 1e3 * seconds[backend], 1e3 * seconds['dense']
      row = dataclasses.asdict(shape)
      row.update(shape=row.pop('name'), backend=backend, capacity=capacity,
                 tokens=shape.sequences * shape.seq_len, ms_moe=ms_moe, ms_dense=ms_dense,
                 ratio=ms_moe / ms_dense)
      rows.append(row)
      print(f'{shape.name:<48} {backend:<9} {ms_moe:9.1f} {ms_dense:9.1f} '
            f'{ms_moe / ms_dense:6.2f}', flush=True)
  if args.json:
    report = dict(platform=device.platform, device=device.device_kind, jax=jax.__version__,
                  dtype=jnp.dtype(dtype).name, capacity_factor=args.capacity_factor,
                  repeats=args.repeats, rows=rows)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')


def _timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def checkpoint_overhead(args):
  """Step times with and without an asynchronous save in flight."""
  config = config_lib.load(args.config, args.overrides)
  mesh = make_mesh(config)
  exchange_model.resolve_exchange_chunks(config, mesh)
  setup = make_setup(config, mesh)
  with jax.set_mesh(setup.mesh), tempfile.TemporaryDirectory() as directory:
    state, step = init_state(setup), make_train_step(setup)
    batch = trainer.global_batch(setup, step_benchmarks.random_batch(config))
    holder = {'state': state}

    def one_step():
      holder['state'], metrics = step(holder['state'], batch)
      return metrics
    for _ in range(3):  # compile and warm up
      _timed(one_step)
    alone = [_timed(one_step) for _ in range(args.repeats)]
    manager = checkpoint.manager(directory, keep=2)
    during, blocking, landing = [], [], []
    for round_index in range(args.saves):
      start = time.perf_counter()
      checkpoint.save(manager, round_index + 1, holder['state'], {'data_rows': 0}, config)
      blocking.append(time.perf_counter() - start)
      while manager.is_saving_in_progress():
        during.append(_timed(one_step))
      landing.append(time.perf_counter() - start)
    manager.close()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(holder['state']))
  report = {
      'config': args.config, 'overrides': args.overrides, 'platform': jax.devices()[0].platform,
      'state_mb': state_bytes / 2**20, 'ms_step_alone': 1e3 * statistics.median(alone),
      'ms_step_during_save': 1e3 * statistics.median(during) if during else None,
      'steps_during_saves': len(during), 'ms_save_blocks': 1e3 * statistics.median(blocking),
      'ms_save_lands': 1e3 * statistics.median(landing)}
  print(f'{args.config}: train state {report["state_mb"]:.1f} MiB on '
        f'{report["platform"]}, medians of {args.repeats} steps and {args.saves} saves')
  for name in ('ms_step_alone', 'ms_step_during_save', 'ms_save_blocks', 'ms_save_lands'):
    value = report[name]
    print(f'  {name:<22} {"n/a" if value is None else f"{value:9.1f}"}')
  print(f'  steps_during_saves     {len(during):9d}')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')


def input_pipeline(args):
  """Document pipeline throughput against the train step's consumption."""
  from moetrain.data import documents, pipeline, sources
  from moetrain.data.tokenizer import load_or_train_stdlib_tokenizer
  config = config_lib.load(args.config, args.overrides)
  t = config.train
  tokenizer = load_or_train_stdlib_tokenizer(config.model.vocab_size)
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / 'stdlib.jsonl'
    with path.open('w') as out:
      for file in sources.stdlib_files('train'):
        out.write(json.dumps({'text': sources.read_text(file)}) + '\n')
    config.data.source, config.data.path = 'jsonl', str(path)
    docs = documents.documents_from_config(config.data, 'train')
    print(f'{len(docs)} documents ({path.stat().st_size / 2**20:.1f} MiB of jsonl), '
          f'batches of {t.batch_size}×{t.seq_len} tokens, {os.cpu_count()} CPUs')
    report = {'config': args.config, 'documents': len(docs), 'pipeline_tokens_per_sec': {}}
    for workers in args.workers:
      iterator = pipeline.train_batches(docs, tokenizer.encode, t.seq_len, t.batch_size,
                                        t.seed, range(t.batch_size), workers)
      next(iterator)
      start = time.perf_counter()
      for _ in range(args.batches):
        next(iterator)
      rate = args.batches * t.batch_size * t.seq_len / (time.perf_counter() - start)
      report['pipeline_tokens_per_sec'][workers] = rate
      print(f'  pipeline, {workers} worker thread(s): {rate:12,.0f} tokens/s')
  t = config.train
  step_s = step_benchmarks.measure_train_step(config, args.repeats)['step_s']
  report['train_tokens_per_sec'] = t.batch_size * t.seq_len / step_s
  print(f'  train step consumes:             {report["train_tokens_per_sec"]:12,.0f} tokens/s')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')


def _peak_rss_mb(command) -> tuple[float, float]:
  """(seconds, peak resident MiB) of a child process running `command`."""
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as log:
    child = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
                             stdout=subprocess.DEVNULL, stderr=log)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
      log.seek(0)
      raise SystemExit(f'{" ".join(map(str, command))} failed:\n{log.read()}')
  return time.perf_counter() - start, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def conversion_memory(args):
  """Time and peak host memory of both conversions on a synthetic checkpoint."""
  from moetrain.convert import families, hf
  from moetrain.convert.safetensors_io import write_checkpoint
  from moetrain.models import layout
  from moetrain.pretrained import abstract_weights
  config = config_lib.load(args.config, args.overrides)
  family = families.family_for(config)
  unscanned = config.model.copy_and_resolve_references()
  unscanned.scan_layers = False
  _, params, buffers = abstract_weights(unscanned)
  shapes = {'params': layout.flatten(params), 'buffers': layout.flatten(buffers)}
  rng = np.random.default_rng(0)

  def tensors():
    for tensor in hf.tensor_plan(config, family, family.model_type == 'deepseek_v3'):
      struct = shapes[tensor.kind][tensor.name]
      shape = struct.shape[1:] if tensor.expert is not None else struct.shape
      value = (0.02 * rng.standard_normal(shape, np.float32)).astype(struct.dtype)
      yield tensor.hf_name, hf.to_hf(tensor, value)
  tool = pathlib.Path(__file__).with_name('convert_checkpoint.py')
  with tempfile.TemporaryDirectory() as directory:
    root = pathlib.Path(directory)
    write_checkpoint(root / 'hf', tensors(), families.config_to_hf(config, family),
                     max_shard_bytes=args.shard_mb * 2**20)
    size_mb = sum(f.stat().st_size for f in (root / 'hf').glob('*.safetensors')) / 2**20
    _, base_mb = _peak_rss_mb([sys.executable, '-c', 'import jax, jax.numpy, orbax.checkpoint, '
                               'moetrain.convert.hf, moetrain.pretrained; jax.numpy.zeros(1)'])
    runs = {'hf-to-moetrain': [root / 'hf', root / 'moetrain'],
            'moetrain-to-hf': [root / 'moetrain', root / 'back',
                               f'--max-shard-gb={args.shard_mb / 1024}']}
    print(f'{args.config} as {family.model_type}: {size_mb:.0f} MiB of safetensors; a process '
          f'importing the libraries peaks at {base_mb:.0f} MiB')
    report = {'config': args.config, 'overrides': args.overrides, 'checkpoint_mb': size_mb,
              'baseline_mb': base_mb}
    for name, command_args in runs.items():
      seconds, peak_mb = _peak_rss_mb([sys.executable, str(tool), name, *command_args])
      report[name] = {'seconds': seconds, 'peak_mb': peak_mb}
      print(f'  {name:<15} {seconds:6.1f} s, peak {peak_mb:7.0f} MiB: '
            f'{(peak_mb - base_mb) / size_mb:4.2f}× the checkpoint above the baseline')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')


def main(argv=None) -> int:
  parser = config_lib.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  layer = commands.add_parser('moe-layer', help='MoE layer train step vs dense, per backend')
  layer.add_argument('--shapes', choices=sorted(SHAPES), default='small')
  layer.add_argument('--backends', nargs='+', choices=LAYER_BACKENDS,
                     default=list(LAYER_BACKENDS))
  layer.add_argument('--capacity-factor', type=float, default=1.25)
  layer.add_argument('--min-capacity', type=int, default=4)
  layer.add_argument('--repeats', type=int, default=5)
  layer.add_argument('--json', help='also write the results to this JSON file')
  layer.set_defaults(run=moe_layer)
  saves = commands.add_parser('checkpoint', help='step time with an async save in flight')
  saves.add_argument('--config', default='configs/tiny.py')
  saves.add_argument('--repeats', type=int, default=20)
  saves.add_argument('--saves', type=int, default=5)
  saves.add_argument('--json', help='also write the results to this JSON file')
  saves.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  saves.set_defaults(run=checkpoint_overhead)
  convert = commands.add_parser('convert', help='time and peak memory of checkpoint conversion')
  convert.add_argument('--config', default='configs/tiny_mixtral.py')
  convert.add_argument('--shard-mb', type=int, default=256, help='safetensors shard size')
  convert.add_argument('--json', help='also write the results to this JSON file')
  convert.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  convert.set_defaults(run=conversion_memory)
  feed = commands.add_parser('input', help='document pipeline tokens/s vs the train step')
  feed.add_argument('--config', default='configs/tiny.py')
  feed.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  feed.add_argument('--batches', type=int, default=50)
  feed.add_argument('--repeats', type=int, default=5)
  feed.add_argument('--json', help='also write the results to this JSON file')
  feed.add_argument('overrides', nargs='*', help='--config.section.key=value overrides')
  feed.set_defaults(run=input_pipeline)
  step_benchmarks.add_parsers(commands)
  bam_benchmark.add_parser(commands)
  try:
    args, overrides = config_lib.parse_with_overrides(parser, argv)
    if args.command == 'moe-layer' and overrides:
      raise ConfigError(f'moe-layer takes no config overrides: {overrides[0]}')
    if args.command != 'moe-layer':
      args.overrides = args.overrides + overrides
    args.run(args)
  except ConfigError as error:
    print(f'benchmark: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
