"""moetrain: train sparse Mixture-of-Experts language models with JAX and Flax."""

__version__ = '0.1.0'


def load(checkpoint_dir, mesh=None):
  """(model, config) from the newest checkpoint in `checkpoint_dir` (a training workdir or a
  converted checkpoint); `model(tokens_BxL)` returns float32 logits [B, L, vocab], dropless.
  With a `mesh` the model is built for it and its weights sharded over it as in training;
  without one they land on the first device."""
  from moetrain.pretrained import load as load_pretrained
  return load_pretrained(checkpoint_dir, mesh)
