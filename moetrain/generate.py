"""Sampling from the model: greedy or with a temperature, dropless routing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_tokens', 'temperature'))
def _sample(graphdef, params, buffers, tokens_1xL, prompt_len, num_tokens, temperature, rng):
  model = nnx.merge(graphdef, params, buffers)
  if not model.causal:
    raise ValueError('model.moe.router=expert_choice looks at future tokens: a model routed '
                     'by expert choice cannot generate text token by token')

  def step(i, carry):
    tokens, rng = carry
    position = prompt_len + i - 1
    logits_V = model(tokens)[0, position]
    rng, key = jax.random.split(rng)
    if temperature > 0:
      token = jax.random.categorical(key, logits_V / temperature)
    else:
      token = jnp.argmax(logits_V)
    return tokens.at[0, position + 1].set(token.astype(tokens.dtype)), rng

  tokens_1xL, _ = jax.lax.fori_loop(0, num_tokens, step, (tokens_1xL, rng))
  return tokens_1xL


def generate(graphdef, params, buffers, prompt_ids, num_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> list[int]:
  """Continues `prompt_ids` by `num_tokens` tokens; returns only the new ids.

  `params` and `buffers` are the model's pure-dict state as the trainer holds it.

  Each step recomputes the whole causal prefix (no KV cache yet), so the cost is quadratic in
  the sequence length; routing is dropless, so the result does not depend on batching.
  """
  length = len(prompt_ids) + num_tokens
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt_ids)] = prompt_ids
  out = _sample(graphdef, params, buffers, jnp.asarray(tokens), len(prompt_ids), num_tokens,
                float(temperature), jax.random.key(seed))
  return np.asarray(out)[0, len(prompt_ids):].tolist()
