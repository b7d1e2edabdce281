"""The flat per-layer parameter names are the same whether or not layers are scanned."""

import jax
import numpy as np
from flax import nnx

from moetrain import config as config_lib
from moetrain.models import layout
from moetrain.state import build_model


def _weights(scan: bool):
  config = config_lib.default_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 32, 16, 2, 2, 8
  m.num_layers, m.scan_layers = 6, scan
  m.moe.num_experts, m.moe.first_dense_layers, m.moe.layer_interval = 4, 1, 2
  m.moe.bias_update_rate = 1e-3  # buffers too
  _, params, buffers = nnx.split(build_model(m, seed=0), nnx.Param, ...)
  as_numpy = lambda state: jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  return m, as_numpy(params), as_numpy(buffers)


def test_scanned_and_unscanned_models_have_the_same_flat_layers():
  plain_config, plain_params, plain_buffers = _weights(scan=False)
  scan_config, scan_params, scan_buffers = _weights(scan=True)
  for plain, scanned in ((plain_params, scan_params), (plain_buffers, scan_buffers)):
    flat_plain = layout.to_layers(plain, plain_config)
    flat_scanned = layout.to_layers(scanned, scan_config)
    assert flat_plain.keys() == flat_scanned.keys()
    for name in flat_plain:  # scanned blocks are created in the same order: same values
      np.testing.assert_array_equal(flat_plain[name], flat_scanned[name], err_msg=name)
    back = layout.from_layers(flat_scanned, scan_config)
    assert jax.tree.structure(back) == jax.tree.structure(scanned)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(scanned)):
      np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(layout.from_layers(flat_plain, plain_config)) == (
        jax.tree.structure(plain))
  # Layers 0 (dense), 1–2 and 3–4 (scan units: a dense then an MoE block), 5 (the tail).
  flat = layout.to_layers(scan_params, scan_config)
  assert {name.split('/')[1] for name in flat if name.startswith('blocks/')} == {
      str(i) for i in range(6)}


def test_router_biases_live_in_the_moe_layers_only():
  config, _, buffers = _weights(scan=True)
  assert sorted(layout.to_layers(buffers, config)) == ['blocks/2/ffn/router_bias',
                                                       'blocks/4/ffn/router_bias']
