"""Sampling: greedy decoding follows the model's argmax; expert choice cannot decode."""

import jax.numpy as jnp
import pytest
from flax import nnx

from moetrain import config as config_lib
from moetrain import generate
from moetrain.models.transformer import Transformer


def model_config(router='softmax'):
  config = config_lib.default_config().model
  config.vocab_size, config.d_model, config.num_layers, config.d_ff = 32, 16, 1, 32
  config.num_heads = config.num_kv_heads = 2
  config.moe.num_experts, config.moe.router = 4, router
  return config


def test_greedy_generation_follows_the_argmax():
  model = Transformer(model_config(), rngs=nnx.Rngs(0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  prompt = [5, 9, 2]
  new = generate.generate(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers),
                          prompt, num_tokens=5)
  tokens = list(prompt)
  for _ in range(5):
    tokens.append(int(jnp.argmax(model(jnp.asarray([tokens]))[0, -1])))
  assert new == tokens[3:]


def test_expert_choice_model_refuses_to_generate():
  model = Transformer(model_config('expert_choice'), rngs=nnx.Rngs(0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match='expert_choice looks at future tokens'):
    generate.generate(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), [1, 2], 3)
