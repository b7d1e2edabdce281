"""Sampling from a model: greedy, temperature and top-p, one token at a time with a key/value
cache (linear cost in the number of tokens), routing dropless.

  python -m moetrain.generate --checkpoint DIR --prompt TEXT [--max_tokens 200]
      [--temperature 0.7] [--top_p 0.9] [--seed 0]

prints the continuation as it is sampled. The prompt is at least one character,
--max_tokens >= 1, --temperature >= 0 (0: greedy) and 0 < --top_p <= 1; bad input prints one
line and exits with status 2.
"""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from moetrain import config as config_lib
from moetrain.errors import ConfigError
from moetrain.models.transformer import init_cache
from moetrain.state import build_model


def choose(logits_V, rng, temperature: float = 0.0, top_p: float = 1.0):
  """The next token: the argmax at temperature 0, else a sample from the smallest set of
  tokens whose probability reaches `top_p` (nucleus sampling), at `temperature`."""
  if temperature <= 0:
    return jnp.argmax(logits_V)
  logits_V = logits_V / temperature
  if top_p < 1:
    probs_V = jax.nn.softmax(logits_V)
    order_V = jnp.argsort(-probs_V)
    before_V = jnp.cumsum(probs_V[order_V]) - probs_V[order_V]  # mass of better tokens
    keep_V = jnp.zeros_like(probs_V, bool).at[order_V].set(before_V < top_p)
    logits_V = jnp.where(keep_V, logits_V, -jnp.inf)
  return jax.random.categorical(rng, logits_V)


def decoding_graphdef(model_config):
  """The graphdef to decode `model_config`'s model with, whatever mesh it trained on: one of
  no mesh, as a batch of one row splits over no mesh axis; GSPMD reads the weights wherever
  they lie."""
  return jax.eval_shape(lambda: nnx.graphdef(build_model(model_config, 0)))


def start(graphdef, params, buffers, length: int):
  """(graphdef, state) of the model with an empty cache for one sequence of `length`."""
  model = nnx.merge(graphdef, params, buffers)
  if not model.causal:
    raise ValueError('model.moe.router=expert_choice looks at future tokens: a model routed '
                     'by expert choice cannot generate text token by token')
  init_cache(model, 1, length)
  return nnx.split(model)


@functools.partial(jax.jit, static_argnames=('graphdef', 'temperature', 'top_p'))
def step(graphdef, state, token, position, rng, temperature=0.0, top_p=1.0):
  """Feeds `token` at `position`; returns (the next token, the state with the cache)."""
  model = nnx.merge(graphdef, state)
  logits_1x1xV, _ = model.forward(jnp.reshape(token, (1, 1)).astype(jnp.int32),
                                  positions_BxL=jnp.reshape(position, (1, 1)))
  return choose(logits_1x1xV[0, 0], rng, temperature, top_p), nnx.state(model)


def stream(graphdef, params, buffers, prompt_ids, num_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0):
  """Yields `num_tokens` new token ids after `prompt_ids`, one per cached decoding step."""
  cache_graph, state = start(graphdef, params, buffers, len(prompt_ids) + num_tokens)
  rng = jax.random.key(seed)
  token = None
  for position in range(len(prompt_ids) + num_tokens - 1):
    fed = prompt_ids[position] if position < len(prompt_ids) else token
    rng, key = jax.random.split(rng)
    token, state = step(cache_graph, state, fed, position, key, float(temperature),
                        float(top_p))
    if position >= len(prompt_ids) - 1:
      yield int(token)


def generate(graphdef, params, buffers, prompt_ids, num_tokens: int,
             temperature: float = 0.0, seed: int = 0, top_p: float = 1.0) -> list[int]:
  """Continues `prompt_ids` by `num_tokens` tokens; returns only the new ids.

  `params` and `buffers` are the model's pure-dict state as the trainer holds it.
  """
  return list(stream(graphdef, params, buffers, list(prompt_ids), num_tokens, temperature,
                     top_p, seed))


def check_arguments(args) -> None:
  """ConfigError naming the flag whose value is out of range; runs before any loading."""
  if not args.prompt:
    raise ConfigError('--prompt is empty: give the text to continue (at least one character)')
  if args.max_tokens < 1:
    raise ConfigError(f'--max_tokens {args.max_tokens}: must be >= 1')
  if not 0 <= args.temperature < math.inf:
    raise ConfigError(f'--temperature {args.temperature}: must be a number >= 0 (0: greedy)')
  if not 0 < args.top_p <= 1:
    raise ConfigError(f'--top_p {args.top_p}: must be > 0 and <= 1 (1: sample from all tokens)')


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = config_lib.ArgumentParser(prog='python -m moetrain.generate',
                                     description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True, help='a training workdir or checkpoint')
  parser.add_argument('--prompt', required=True, help='the text to continue (not empty)')
  parser.add_argument('--max_tokens', type=int, default=200, help='tokens to sample (>= 1)')
  parser.add_argument('--temperature', type=float, default=0.0, help='>= 0; 0 is greedy')
  parser.add_argument('--top_p', type=float, default=1.0, help='nucleus mass, > 0 and <= 1')
  parser.add_argument('--seed', type=int, default=0)
  try:
    args = parser.parse_args(argv)
    check_arguments(args)
    from moetrain import pretrained
    from moetrain.data.inputs import load_tokenizer
    model, config = pretrained.load(args.checkpoint)
    tokenizer = load_tokenizer(config)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) + args.max_tokens > config.model.max_seq_len:
      raise ConfigError(f'--max_tokens {args.max_tokens}: prompt ({len(prompt)} tokens) and '
                        f'continuation must fit model.max_seq_len={config.model.max_seq_len}')
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    new = []
    print(args.prompt, end='', flush=True)
    for token in stream(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), prompt,
                        args.max_tokens, args.temperature, args.top_p, args.seed):
      shown = tokenizer.decode(new)
      new.append(token)
      print(tokenizer.decode(new)[len(shown):], end='', flush=True)
    print()
  except (ConfigError, ValueError) as error:
    print(f'moetrain: error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
