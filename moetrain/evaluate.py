"""Loss and perplexity of a checkpoint on a split of its data.

  python -m moetrain.evaluate --checkpoint DIR [--split eval|train] [--batches N]
      [--config.data.source=jsonl --config.data.path=… (any field of the saved config)]

Routing is dropless (as `moetrain.load`), so the result does not depend on how many tokens
are evaluated together. The periodic eval in training routes with
`model.moe.eval_capacity_factor` instead; pass that override to route (and score) as it did.
The command prints how it routes. Bad input prints one line and exits with status 2.
"""

import math
import os
import sys

from moetrain import config as config_lib
from moetrain.errors import ConfigError


_EVAL_CAPACITY = 'model.moe.eval_capacity_factor'


def routing(moe, trained_with: float) -> str:
  """One line: how `moe` (a config's model.moe section, as evaluated) routes, and whether the
  periodic eval in training, which used `trained_with` as eval capacity factor, routed alike."""
  cf = moe.eval_capacity_factor
  if moe.router == 'expert_choice':
    how = (f'expert choice among {moe.num_experts} experts, capacity factor {cf}'
           + ('' if cf else ' (every expert takes every token)'))
  elif cf:
    how = (f'top-{moe.top_k} of {moe.num_experts} experts, eval capacity factor {cf} (tokens '
           "over an expert's capacity are dropped)")
  else:
    how = f'top-{moe.top_k} of {moe.num_experts} experts, dropless'
  if cf == trained_with:
    return f'routing: {how}, as the periodic eval in training'
  return (f'routing: {how}; the periodic eval in training used {_EVAL_CAPACITY}={trained_with}'
          f', so its loss can differ (pass --config.{_EVAL_CAPACITY}={trained_with} to match it)')


def evaluate(checkpoint_dir, split: str = 'eval', num_batches: int = 0, overrides=()) -> dict:
  """{'loss', 'perplexity', 'tokens', 'routing'} of the newest checkpoint in `checkpoint_dir` on
  `num_batches` (0: the config's `train.eval_batches`) fixed batches of `split`, routed dropless
  unless `overrides` set model.moe.eval_capacity_factor; 'routing' says how (`routing`)."""
  import jax
  from moetrain import checkpoint, exchange_model, trainer
  from moetrain.data.inputs import fixed_batches, load_tokenizer
  from moetrain.data.tokenizer import PAD_ID
  from moetrain.parallel import sharding
  from moetrain.parallel.mesh import make_mesh
  from moetrain.state import abstract_state, make_setup
  from moetrain.steps import make_eval_step
  config = checkpoint.model_config(checkpoint_dir)
  trained_with = config.model.moe.eval_capacity_factor
  config_lib.with_overrides(config, overrides)
  if not any(flag.startswith(f'--config.{_EVAL_CAPACITY}=') for flag in overrides):
    config.model.moe.eval_capacity_factor = 0.0
  mesh = make_mesh(config)
  exchange_model.resolve_exchange_chunks(config, mesh)
  setup = make_setup(config, mesh)
  tokenizer = load_tokenizer(config)
  batches = fixed_batches(config, tokenizer, split, num_batches or config.train.eval_batches,
                          sharding.process_rows(setup.batch_sharding, config.train.batch_size))
  abstract = abstract_state(setup)
  with jax.set_mesh(mesh):
    params, buffers = checkpoint.restore_weights(checkpoint_dir, abstract['params'],
                                                 abstract['buffers'], config)
    loss = trainer.evaluate(setup, make_eval_step(setup),
                            {'params': params, 'buffers': buffers}, batches)
  tokens = sum(int((batch['targets'] != PAD_ID).sum()) for batch in batches)
  return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': tokens,
          'routing': routing(config.model.moe, trained_with) if config.model.moe.num_experts
          else 'routing: none (a dense model)'}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = config_lib.ArgumentParser(prog='python -m moetrain.evaluate',
                                     description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True, help='a training workdir or checkpoint')
  parser.add_argument('--split', choices=('eval', 'train'), default='eval')
  parser.add_argument('--batches', type=int, default=0,
                      help='fixed batches spread over the split (default: train.eval_batches)')
  try:
    args, overrides = config_lib.parse_with_overrides(parser, argv)
    if args.batches < 0:
      raise ConfigError(f'--batches {args.batches}: must be >= 1, or 0 for train.eval_batches')
    result = evaluate(args.checkpoint, args.split, args.batches, overrides)
  except ConfigError as error:
    print(f'moetrain: error: {error}', file=sys.stderr)
    return 2
  print(result['routing'])
  print(f'{args.checkpoint} on {args.split}: loss {result["loss"]:.4f}, perplexity '
        f'{result["perplexity"]:.2f} over {result["tokens"]:,} tokens (this process)')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
