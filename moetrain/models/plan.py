"""How a model's blocks are laid out as scanned stacks: plain arithmetic on the config, light
enough for config validation to use before JAX is imported."""


def layer_plan(config):
  """(dense stack size, MoE units, unit length, trailing dense blocks) for scanned layers."""
  moe = config.moe
  if not moe.num_experts:
    return config.num_layers, 0, 1, 0
  dense = moe.first_dense_layers
  units = (config.num_layers - dense) // moe.layer_interval
  return dense, units, moe.layer_interval, config.num_layers - dense - units * moe.layer_interval


def main_stack(config) -> str:
  """The scanned stack that pipeline stages split: the MoE units, or a dense model's blocks."""
  return 'moe_stack' if layer_plan(config)[1] else 'dense_stack'


def is_moe_layer(config, index: int) -> bool:
  """Every `layer_interval`-th block after `first_dense_layers` is MoE (Qwen's sparse step)."""
  moe = config.moe
  if not moe.num_experts or index < moe.first_dense_layers:
    return False
  return (index - moe.first_dense_layers + 1) % moe.layer_interval == 0


def routed_layer_count(config) -> int:
  """MoE blocks a train step runs: the main model's and the multi-token-prediction modules'."""
  main = layer_plan(config)[1]
  return main + sum(is_moe_layer(config, config.num_layers + j)
                    for j in range(config.get('mtp_layers', 0)))
