"""Loading a model's weights from a checkpoint directory, for inference and conversion."""

import jax
from flax import nnx

from moetrain import checkpoint
from moetrain.trainer import build_model


def abstract_weights(model_config, sharding=None):
  """(graphdef, params, buffers) of `model_config` as jax.ShapeDtypeStruct pure dicts."""
  model = nnx.eval_shape(lambda: build_model(model_config, 0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  struct = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  return (graphdef, jax.tree.map(struct, nnx.to_pure_dict(params)),
          jax.tree.map(struct, nnx.to_pure_dict(buffers)))


def load(checkpoint_dir):
  """(model, config) from the newest checkpoint in `checkpoint_dir`: a training workdir, or
  what `tools/convert_checkpoint.py` wrote. `model(tokens_BxL)` gives float32 logits
  [B, L, vocab], routing dropless like Hugging Face models. Weights land on the first device.
  """
  config = checkpoint.model_config(checkpoint_dir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  graphdef, params, buffers = abstract_weights(config.model, device)
  params, buffers = checkpoint.restore_weights(checkpoint_dir, params, buffers)
  return nnx.merge(graphdef, params, buffers), config
