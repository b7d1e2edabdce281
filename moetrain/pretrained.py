"""Loading a model's weights from a checkpoint directory, for inference and conversion."""

import jax
from flax import nnx

from moetrain import checkpoint
from moetrain.state import abstract_model, build_model


def abstract_weights(model_config, sharding=None):
  """(graphdef, params, buffers) of `model_config` as jax.ShapeDtypeStruct pure dicts."""
  model = nnx.eval_shape(lambda: build_model(model_config, 0))
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  struct = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  return (graphdef, jax.tree.map(struct, nnx.to_pure_dict(params)),
          jax.tree.map(struct, nnx.to_pure_dict(buffers)))


def load(checkpoint_dir, mesh=None):
  """(model, config) from the newest checkpoint in `checkpoint_dir`: a training workdir, or
  what `tools/convert_checkpoint.py` wrote. `model(tokens_BxL)` gives float32 logits
  [B, L, vocab], routing dropless like Hugging Face models. With a `mesh` the model is built
  for it and its weights are sharded over it as in training; without one they land on the
  first device.
  """
  config = checkpoint.model_config(checkpoint_dir)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, params, buffers = abstract_weights(config.model, device)
  else:
    graphdef, params, buffers = abstract_model(config.model, mesh)
  params, buffers = checkpoint.restore_weights(checkpoint_dir, params, buffers)
  return nnx.merge(graphdef, params, buffers), config
