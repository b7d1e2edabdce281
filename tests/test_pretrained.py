"""moetrain.load: on the first device, or built for a mesh with its weights sharded over it."""

import jax
import numpy as np
from flax import nnx

import moetrain
from moetrain.parallel.mesh import make_mesh
from moetrain.state import make_setup
from tests.test_evaluate import saved


def test_load_for_a_mesh_shards_the_weights_as_training_does(tmp_path):
  directory, config = saved(tmp_path)
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 2, 2, 2
  mesh = make_mesh(config, jax.devices()[:8])
  tokens = np.random.default_rng(0).integers(4, config.model.vocab_size, (8, 16))
  plain, _ = moetrain.load(directory)
  sharded, _ = moetrain.load(directory, mesh)
  assert plain.mesh is None and sharded.mesh is mesh
  expected = make_setup(config, mesh).state_shardings['params']
  jax.tree.map(lambda array, sharding: np.testing.assert_equal(array.sharding, sharding),
               nnx.to_pure_dict(nnx.state(sharded, nnx.Param)), expected)
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda tokens: sharded(tokens))(tokens)
  np.testing.assert_allclose(logits, jax.jit(lambda tokens: plain(tokens))(tokens), rtol=1e-5,
                             atol=1e-5)
