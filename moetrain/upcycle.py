"""Dense → MoE initialisation (upcycling) on flat per-layer parameter dicts.

Works on the names `layout.to_layers` gives (`embed`, `blocks/3/ffn/w_gate`, ...), with numpy
arrays on the host or jax arrays inside `jax.jit` alike. Every random draw comes from the
explicit `rng`. The MoE model's freshly initialised parameters give the output's shapes and
dtypes and the fresh router. Shape suffixes: M dense models, E experts, D d_model, F the dense
d_ff, Fe an expert's width, G segments of a dense MLP (granular).
"""

import jax
import jax.numpy as jnp
import numpy as np

from moetrain.models.plan import is_moe_layer

MLP_NAMES = ('w_gate', 'w_up', 'w_down')
# Attention experts: the axis of each projection along which the experts' heads are stacked
# (wq [D, A·N, H], wo [A·N, H, D], ...); every other attention param (qk-norm scales) is
# stacked on a new leading expert axis. KV_NAMES are one set, the models' mean, when shared.
HEAD_AXIS = {'wq': 1, 'wk': 1, 'wv': 1, 'wo': 0, 'q_bias': 0, 'k_bias': 0, 'v_bias': 0}
KV_NAMES = ('wk', 'wv', 'k_bias', 'v_bias', 'k_norm/scale')


def _shape_error(name, got, want):
  return ValueError(f'parameter {name}: the dense model has shape {tuple(got)}, the MoE model '
                    f'expects {tuple(want)}')


def average(name: str, arrays: list, target) -> jax.Array:
  """Elementwise mean over the dense models (one model: a copy), in `target`'s dtype: [...]."""
  for array in arrays:
    if tuple(array.shape) != tuple(target.shape):
      raise _shape_error(name, array.shape, target.shape)
  if len(arrays) == 1:
    return jnp.asarray(arrays[0]).astype(target.dtype)
  stacked = jnp.stack([jnp.asarray(a, jnp.float32) for a in arrays])
  return jnp.mean(stacked, axis=0).astype(target.dtype)


def attention_expert_param(name: str, arrays: list, target, share_kv: bool) -> jax.Array:
  """An attention-experts param from the M dense models' one: expert m is model m (its heads
  at [m·N, (m+1)·N) of the head axis, or its norm scale [m]); shared K/V the models' mean."""
  key = name.split('/attention/', 1)[1]
  if share_kv and key in KV_NAMES:
    return average(name, arrays, target)
  arrays = [jnp.asarray(a, jnp.float32) for a in arrays]
  if key in HEAD_AXIS:
    return jnp.concatenate(arrays, axis=HEAD_AXIS[key]).astype(target.dtype)
  return jnp.stack(arrays).astype(target.dtype)


def dense_mlps(dense_models: list, layer: int) -> dict:
  """Layer `layer`'s dense MLPs, stacked in float32: w_gate/w_up [M, D, F], w_down [M, F, D]."""
  mlps = {}
  for key in MLP_NAMES:
    name = f'blocks/{layer}/ffn/{key}'
    arrays = [model.get(name) for model in dense_models]
    if any(a is None or a.ndim != 2 for a in arrays):
      raise ValueError(f'parameter {name}: every upcycled model needs a dense 2-D MLP matrix '
                       'here (upcycle_from must name dense checkpoints)')
    for array in arrays[1:]:
      if array.shape != arrays[0].shape:
        raise ValueError(f'parameter {name}: the dense models disagree, shapes '
                         f'{tuple(arrays[0].shape)} and {tuple(array.shape)}')
    mlps[key] = jnp.stack([jnp.asarray(a, jnp.float32) for a in arrays])
  return mlps


def copy_experts(mlps: dict, num_experts: int) -> dict:
  """Expert e copies model e // (E/M)'s MLP (contiguous groups): [M, D, F] → [E, D, F]."""
  per_model = num_experts // mlps['w_gate'].shape[0]
  return {key: jnp.repeat(w, per_model, axis=0) for key, w in mlps.items()}


def split_experts(mlps: dict, num_experts: int, d_expert: int) -> dict:
  """Expert r·G + g holds hidden units [g·Fe, (g+1)·Fe) of the one dense MLP: → [E, D, Fe]."""
  _, d, f = mlps['w_gate'].shape
  segments = f // d_expert
  replicas = num_experts // segments
  columns = lambda w_DxF: w_DxF.reshape(d, segments, d_expert).transpose(1, 0, 2)
  split = {'w_gate': columns(mlps['w_gate'][0]), 'w_up': columns(mlps['w_up'][0]),
           'w_down': mlps['w_down'][0].reshape(segments, d_expert, d)}
  return {key: jnp.tile(w, (replicas, 1, 1)) for key, w in split.items()}


def add_noise(experts: dict, std_E: dict, noise: float, rng) -> dict:
  """w + noise·std(dense w)·N(0, 1), independent per expert and matrix: [E, ...] → [E, ...]."""
  keys = dict(zip(MLP_NAMES, jax.random.split(rng, len(MLP_NAMES))))
  return {key: w + noise * std_E[key][:, None, None] * jax.random.normal(keys[key], w.shape)
          for key, w in experts.items()}


def drop_mask(rng, num_experts: int, width: int, count: int) -> jax.Array:
  """Exactly `count` random hidden units per expert, a different subset each: → [E, F] bool."""
  uniform_ExF = jax.random.uniform(rng, (num_experts, width))
  # The rank of each unit in a random order: a uniform random permutation per expert.
  rank_ExF = jnp.argsort(jnp.argsort(uniform_ExF, axis=-1), axis=-1)
  return rank_ExF < count


def drop_upcycled_units(experts: dict, mean_E: dict, std_E: dict, drop_ratio: float,
                        rng) -> dict:
  """Drop-Upcycling: re-draws round(r·Fe) hidden units per expert from N(mean, std) of the
  dense matrix (columns of w_gate/w_up [E, D, Fe], the same rows of w_down [E, Fe, D])."""
  num_experts, _, width = experts['w_gate'].shape
  mask_rng, *keys = jax.random.split(rng, 1 + len(MLP_NAMES))
  mask_ExF = drop_mask(mask_rng, num_experts, width, round(drop_ratio * width))
  masks = {'w_gate': mask_ExF[:, None, :], 'w_up': mask_ExF[:, None, :],
           'w_down': mask_ExF[:, :, None]}
  out = {}
  for key, k in zip(MLP_NAMES, keys):
    w = experts[key]
    fresh = (mean_E[key][:, None, None]
             + std_E[key][:, None, None] * jax.random.normal(k, w.shape, jnp.float32))
    out[key] = jnp.where(masks[key], fresh, w)
  return out


def virtual_group_router(router_DxE, group: int) -> jax.Array:
  """He et al.'s virtual groups: G consecutive experts share the first one's column: [D, E]."""
  d, e = router_DxE.shape
  first_DxRx1 = router_DxE.reshape(d, e // group, group)[:, :, :1]
  return jnp.broadcast_to(first_DxRx1, (d, e // group, group)).reshape(d, e)


def _check_granular(moe, models: int, f: int, fe: int, e: int) -> int:
  """Raises unless the granular split applies; returns G, the segments per dense MLP."""
  if models != 1:
    raise ValueError(f'init.upcycle=granular splits one dense model, got {models}')
  if f % fe:
    raise ValueError(f'init.upcycle=granular: the dense d_ff={f} must be a multiple of '
                     f'model.moe.d_expert={fe}')
  g = f // fe
  rules = ((e % g, f'model.moe.num_experts={e} must be a multiple of G={g} segments'),
           (moe.top_k % g, f'model.moe.top_k={moe.top_k} must be a multiple of G={g}'),
           ((e // moe.num_groups) % g, f'model.moe.num_groups={moe.num_groups} must keep '
            f'virtual groups of G={g} experts whole'),
           (not moe.norm_topk_prob, 'model.moe.norm_topk_prob must be True'),
           (moe.num_null_experts, 'model.moe.num_null_experts must be 0'),
           (moe.router == 'expert_choice', 'model.moe.router must choose experts per token'))
  for broken, message in rules:
    if broken:
      raise ValueError(f'init.upcycle=granular: {message}')
  return g


def shared_expert(mlps: dict, target: dict, prefix: str) -> dict:
  """The shared expert as the (mean) dense MLP giving half its output: [D, S], [S, D], [D, 1]."""
  f = mlps['w_gate'].shape[2]
  width = target[prefix + 'shared/w_gate'].shape[1]
  if width != f:
    raise ValueError(f'model.moe.num_shared_experts × model.moe.d_shared_expert = {width} '
                     f'must equal the dense d_ff={f} to upcycle the shared expert')
  mean = {key: jnp.mean(w, axis=0) for key, w in mlps.items()}
  gated = prefix + 'shared_gate' in target
  # sigmoid(0) = 1/2 halves a gated shared expert; an ungated one is halved in its w_down.
  mean['w_down'] = mean['w_down'] * (1.0 if gated else 0.5)
  out = {f'{prefix}shared/{key}': w for key, w in mean.items()}
  if gated:
    out[prefix + 'shared_gate'] = jnp.zeros_like(target[prefix + 'shared_gate'])
  return out


def routed_experts(mlps: dict, moe, mode: str, e: int, fe: int):
  """Copied or split experts [E, D, Fe] / [E, Fe, D], G (1 for copies), source model per expert."""
  models, _, f = mlps['w_gate'].shape
  if mode == 'granular':
    segments = _check_granular(moe, models, f, fe, e)
    return split_experts(mlps, e, fe), segments, np.zeros(e, int)
  if mode not in ('copy', 'drop'):
    raise ValueError(f'init.upcycle={mode!r} must be one of copy, drop, granular')
  if e % models:
    raise ValueError(f'model.moe.num_experts={e} must be divisible by the {models} dense '
                     'models in init.upcycle_from')
  if fe != f:
    raise ValueError(f'model.moe.d_expert={fe} must equal the dense d_ff={f} for '
                     f'init.upcycle={mode}')
  return copy_experts(mlps, e), 1, np.arange(e) // (e // models)


def moe_layer(mlps: dict, target: dict, prefix: str, moe, init_config, rng) -> dict:
  """One MoE layer's FFN params (names under `prefix`) from the dense MLPs [M, ...].

  With k renormalised gate weights summing to s = routed_scaling_factor, copies of the dense
  MLP sum to s·dense, so w_down is scaled by 1/s. A shared expert is the (mean) dense MLP; it
  and the routed experts each give half: the shared_gate starts at 0 (sigmoid(0) = 1/2), or
  without a gate the shared w_down is halved; the routed w_down is halved too. So with one
  dense model and renormalised gates, copy and granular start equal to the dense model (drop
  and noise deliberately do not).
  """
  e, _, fe = target[prefix + 'w_gate'].shape
  if not moe.routed_scaling_factor > 0:
    raise ValueError('model.moe.routed_scaling_factor must be > 0 to upcycle')
  experts, segments, model_E = routed_experts(mlps, moe, init_config.upcycle, e, fe)
  std_E = {key: jnp.std(w, axis=(1, 2))[model_E] for key, w in mlps.items()}
  noise_rng, drop_rng = jax.random.split(rng)
  if init_config.noise:
    experts = add_noise(experts, std_E, init_config.noise, noise_rng)
  if init_config.upcycle == 'drop':
    mean_E = {key: jnp.mean(w, axis=(1, 2))[model_E] for key, w in mlps.items()}
    experts = drop_upcycled_units(experts, mean_E, std_E, init_config.drop_ratio, drop_rng)
  shared = bool(moe.num_shared_experts)
  half = 0.5 if shared else 1.0
  # Granular: the k = G·k' chosen experts are k' whole replicas (scores tie within a virtual
  # group), and renormalising gives each expert of chosen replica r the weight s·p_r/(G·Σ p_r')
  # over chosen r'. A replica's G segments add up to the dense MLP, so routed = (s/G)·dense:
  # w_down gets G/s (times 1/2 with a shared expert). Copy is the case G = 1.
  experts['w_down'] = experts['w_down'] * (half * segments / moe.routed_scaling_factor)
  router = target[prefix + 'router']
  out = {prefix + key: w for key, w in experts.items()}
  out[prefix + 'router'] = virtual_group_router(router, segments) if segments > 1 else router
  if shared:
    out.update(shared_expert(mlps, target, prefix))
  return out


def upcycle(dense_models: list, target_params: dict, model_config, init_config, rng) -> dict:
  """Flat params of the MoE `model_config` from M dense models' flat params.

  Non-FFN params (embeddings, norms, attention) and the MLPs of the target's dense layers are
  copied, or with several models averaged elementwise (Branch-Train-MiX); with
  `model.attention_experts` each model's attention becomes one expert instead (BAM, see
  `attention_expert_param`), its router at zeros: the uniform mixture. MoE layers follow
  `init_config.upcycle` (copy | drop | granular, see `moe_layer`); routers come from
  `target_params` (fresh). Raises ValueError naming the parameter on any mismatch.
  """
  dense_models = list(dense_models)
  if not dense_models:
    raise ValueError('upcycling needs at least one dense model')
  ffn = lambda name: '/ffn/' in name
  for name in sorted(set().union(*dense_models) - set(target_params)):
    if not ffn(name):
      raise ValueError(f'parameter {name}: in the dense model but not in the MoE model')
  experts, share_kv = model_config.attention_experts, model_config.attention_experts_share_kv
  if experts and experts != len(dense_models):
    raise ValueError(f'model.attention_experts={experts} must equal the {len(dense_models)} '
                     'dense models in init.upcycle_from (one expert each)')
  out = {}
  for name, target in target_params.items():
    if ffn(name):
      continue
    if experts and name.endswith('/attention/attention_router'):
      out[name] = jnp.zeros_like(target)  # a uniform mixture: the experts' mean
      continue
    if any(name not in model for model in dense_models):
      raise ValueError(f'parameter {name}: in the MoE model but missing from a dense model')
    arrays = [model[name] for model in dense_models]
    out[name] = (attention_expert_param(name, arrays, target, share_kv)
                 if experts and '/attention/' in name else average(name, arrays, target))
  for layer in range(model_config.num_layers + model_config.mtp_layers):
    prefix = f'blocks/{layer}/ffn/'
    mlps = dense_mlps(dense_models, layer)
    if is_moe_layer(model_config, layer):
      layer_rng = jax.random.fold_in(rng, layer)
      ffn_params = moe_layer(mlps, target_params, prefix, model_config.moe, init_config,
                             layer_rng)
    else:
      ffn_params = {prefix + key: jnp.mean(w, axis=0) for key, w in mlps.items()}
    out.update(ffn_params)
  for name, target in target_params.items():
    if name not in out:
      raise ValueError(f'parameter {name}: no upcycling rule gives it')
    if tuple(out[name].shape) != tuple(target.shape):
      raise _shape_error(name, out[name].shape, target.shape)
    out[name] = out[name].astype(target.dtype)
  return {name: out[name] for name in target_params}
