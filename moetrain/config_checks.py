"""The config's validation rules: enumerations, ranges and the constraints between fields.

Runs before any device work; every ConfigError names the field and what is wrong with it.
"""

from moetrain import liveness, watchdog
from moetrain.errors import ConfigError
from moetrain.models.plan import layer_plan

ENUMS = {
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention': ('mha', 'mla'),
    'model.qk_norm': ('none', 'per_head', 'full'),
    'model.fp8': ('none', 'tensorwise', 'blockwise'),
    'model.rope_scaling.type': ('none', 'yarn', 'llama3'),
    'init.upcycle': ('copy', 'drop', 'granular'),
    'model.moe.router': ('softmax', 'sigmoid', 'expert_choice', 'top_p'),
    'model.moe.aux_loss': ('local', 'global', 'sequence', 'none'),
    'model.moe.drop_policy': ('position', 'priority'),
    'model.moe.dispatch': ('auto', 'capacity', 'einsum'),
    'model.moe.exchange_dtype': ('', 'float8_e4m3fn'),
    'model.moe.exchange_overlap': ('experts', 'block'),
    'train.schedule': ('cosine', 'constant'),
    'train.remat': ('none', 'full', 'save_dots'),
    'data.source': ('stdlib', 'text', 'jsonl', 'parquet', 'tfds'),
    'data.on_bad_record': ('error', 'skip'),
}

POSITIVE = (
    'model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
    'model.num_kv_heads', 'model.d_ff', 'model.max_seq_len', 'model.moe.group_size',
    'model.scan_unroll',
    'model.moe.layer_interval', 'model.moe.num_groups', 'model.moe.topk_groups', 'train.steps',
    'train.batch_size', 'train.seq_len',
    'train.log_every', 'train.eval_batches', 'train.microbatches', 'train.keep_checkpoints',
    'train.max_nonfinite_steps',
)

NON_NEGATIVE = (
    'model.head_dim', 'model.moe.num_experts', 'model.moe.d_expert', 'model.moe.min_capacity',
    'model.moe.first_dense_layers', 'model.moe.aux_loss_weight', 'model.moe.z_loss_weight',
    'model.moe.num_shared_experts', 'model.moe.d_shared_expert', 'model.moe.bias_update_rate',
    'model.moe.jitter', 'model.moe.num_null_experts', 'model.moe.routed_scaling_factor',
    'model.moe.dynamic_loss_weight', 'model.attention_experts',
    'train.warmup_steps', 'train.eval_every', 'train.weight_decay', 'train.grad_clip',
    'train.sample_tokens', 'train.learning_rate', 'train.checkpoint_every',
    'train.permanent_every', 'model.q_lora_rank', 'init.noise', 'data.workers',
    'train.profile_steps', 'model.moe.capacity_factor', 'model.moe.eval_capacity_factor',
    'model.moe.exchange_nodes', 'model.moe.exchange_chunks', 'model.mtp_layers',
    'model.mtp_loss_weight', 'model.moe.router_outputs', 'model.moe.skip_ratio',
)


_FILES = ('text', 'jsonl', 'parquet')
_DOCUMENTS = (*_FILES, 'tfds')

# The data fields only some sources read; under any other source they must keep their default.
SOURCE_FIELDS = {
    'path': _FILES,
    'text_field': ('jsonl', 'parquet', 'tfds'),
    'tfds_name': ('tfds',),
    'data_dir': ('tfds',),
    'weights': _DOCUMENTS,
    'split': _DOCUMENTS,
    'eval_split': _DOCUMENTS,
    'on_bad_record': ('jsonl',),
}


def _get(config, dotted):
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def validate(config) -> None:
  """Checks every field that can be checked without devices; raises ConfigError."""
  if config.model.moe.dispatch == 'dropless':
    raise ConfigError('model.moe.dispatch=dropless: dropless routing is '
                      'model.moe.capacity_factor=0; dispatch only picks how capacity buffers '
                      f'are built ({", ".join(ENUMS["model.moe.dispatch"])})')
  for field, allowed in ENUMS.items():
    if _get(config, field) not in allowed:
      raise ConfigError(f'{field}={_get(config, field)!r} must be one of {", ".join(allowed)}')
  for field in POSITIVE:
    if not _get(config, field) > 0:
      raise ConfigError(f'{field}={_get(config, field)} must be > 0')
  for field in NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise ConfigError(f'{field}={_get(config, field)} must be >= 0')

  m, e, t = config.model, config.model.moe, config.train
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_heads={m.num_heads} must be a multiple of '
                      f'model.num_kv_heads={m.num_kv_heads}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'model.d_model={m.d_model} must be divisible by '
                      f'model.num_heads={m.num_heads} when model.head_dim=0')
  if m.attention == 'mla':
    _validate_mla(m)
  elif (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError('the head dimension (model.head_dim, or model.d_model // '
                      'model.num_heads) must be even for rotary embeddings')
  _validate_rope_scaling(m.rope_scaling)
  _validate_attention_experts(config)
  if config.init.from_checkpoint and config.init.upcycle_from:
    raise ConfigError('init.from_checkpoint and init.upcycle_from exclude each other')
  if not 0 <= config.init.drop_ratio <= 1:
    raise ConfigError(f'init.drop_ratio={config.init.drop_ratio} must be between 0 and 1')
  _validate_data(config.data)
  if config.init.upcycle_from and not e.num_experts:
    raise ConfigError('init.upcycle_from needs an MoE model (model.moe.num_experts > 0)')
  if e.num_experts:
    _validate_moe(e, m, t)
  if t.seq_len > m.max_seq_len:
    raise ConfigError(f'train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}')
  if t.batch_size % e.group_size:
    raise ConfigError(f'train.batch_size={t.batch_size} must be divisible by '
                      f'model.moe.group_size={e.group_size}')
  if t.batch_size % (t.microbatches * e.group_size):
    raise ConfigError(f'train.batch_size={t.batch_size} must be divisible by '
                      f'train.microbatches={t.microbatches} × '
                      f'model.moe.group_size={e.group_size}')
  axes = ('stage', 'data', 'fsdp', 'expert', 'tensor')
  for axis in axes:
    size = config.mesh[axis]
    if size != -1 and size < 1:
      raise ConfigError(f'mesh.{axis}={size} must be >= 1, or -1 to fill the devices')
  if sum(config.mesh[a] == -1 for a in axes) > 1:
    raise ConfigError('at most one of ' + ', '.join(f'mesh.{a}' for a in axes) + ' may be -1')
  _validate_stages(config)
  if e.exchange_overlap == 'block' and e.aux_loss == 'global':
    # Each chunk of a block sees only its own rows; a pooled balance loss is not a combination
    # of the chunks' losses.
    raise ConfigError("model.moe.exchange_overlap=block cannot run with "
                      "model.moe.aux_loss=global: use local or sequence")
  try:
    liveness.check_timeout(t.heartbeat_timeout_s)
  except ValueError:
    raise ConfigError(f'train.heartbeat_timeout_s={t.heartbeat_timeout_s} must be at least '
                      f'{liveness.HEARTBEAT_FLOOR_S:.0f} s') from None
  try:
    watchdog.timeout_from(t.step_timeout_s)
  except ValueError:
    raise ConfigError(f'train.step_timeout_s={t.step_timeout_s!r} must be auto or a number of '
                      'seconds > 0') from None


def _validate_stages(config):
  """The main layer stack must split over mesh.stage × model.pipeline_repeats, and the
  pipeline needs a microbatch for every stage."""
  m, stages, repeats = config.model, config.mesh.stage, config.model.pipeline_repeats
  if repeats < 1:
    raise ConfigError(f'model.pipeline_repeats={repeats} must be >= 1')
  units = layer_plan(m)[1] or layer_plan(m)[0]
  if repeats > 1 and not m.scan_layers:
    raise ConfigError(f'model.pipeline_repeats={repeats} needs model.scan_layers=True')
  if units % repeats:
    raise ConfigError(f'model.pipeline_repeats={repeats} must divide the {units} units of the '
                      'main layer stack')
  if stages == 1:
    return
  if not m.scan_layers:
    raise ConfigError(f'mesh.stage={stages} needs model.scan_layers=True: stages split the '
                      'scanned layer stack')
  if units % (stages * repeats):
    raise ConfigError(f'the {units} units of the main layer stack must split over mesh.stage='
                      f'{stages} × model.pipeline_repeats={repeats}')
  if config.train.microbatches < stages:
    raise ConfigError(f'train.microbatches={config.train.microbatches} must be >= '
                      f'mesh.stage={stages}: the pipeline needs a microbatch for every stage')
  if config.train.microbatches % stages:
    # The embedding and the head split the microbatches over the stages.
    raise ConfigError(f'train.microbatches={config.train.microbatches} must be a multiple of '
                      f'mesh.stage={stages}')


def _validate_data(d):
  """Checks that the data source names what it reads."""
  if d.source in _FILES and not d.path.strip():
    raise ConfigError(f'data.path is empty; data.source={d.source} reads files from it')
  if d.source == 'tfds' and not d.tfds_name.strip():
    raise ConfigError('data.tfds_name is empty; data.source=tfds reads a dataset by name')
  if d.weights.strip():
    parts = d.tfds_name if d.source == 'tfds' else d.path
    count = len([x for x in parts.split(',') if x.strip()])
    weights = [x for x in d.weights.split(',') if x.strip()]
    if len(weights) != count:
      raise ConfigError(f'data.weights={d.weights!r} has {len(weights)} weights for {count} '
                        'sources')
    try:
      bad = [w for w in weights if not float(w) > 0]
    except ValueError:
      bad = weights
    if bad:
      raise ConfigError(f'data.weights={d.weights!r}: weights must be positive numbers')


def validate_source_fields(data, defaults) -> None:
  """ConfigError naming a `data` field set away from its default (`defaults`, the schema's data
  section) although `data.source` does not read it."""
  for field, readers in SOURCE_FIELDS.items():
    if data.source not in readers and data[field] != defaults[field]:
      default = 'empty' if defaults[field] == '' else f'at {defaults[field]!r}'
      raise ConfigError(f'data.{field}={data[field]!r} is set but data.source={data.source} '
                        f'does not read it: set data.source to {_either(readers)} to read it, '
                        f'or leave data.{field} {default}')


def _either(names):
  return names[0] if len(names) == 1 else f'{", ".join(names[:-1])} or {names[-1]}'


def _validate_attention_experts(config):
  """Checks the attention experts (BAM) against the attention kind and the upcycled models."""
  m = config.model
  if m.attention_experts_share_kv and not m.attention_experts:
    raise ConfigError('model.attention_experts_share_kv=True needs model.attention_experts > 0')
  if m.attention_experts and m.attention == 'mla':
    raise ConfigError(f'model.attention_experts={m.attention_experts} is only for '
                      'model.attention=mha')
  models = [d for d in config.init.upcycle_from.split(',') if d.strip()]
  if m.attention_experts and models and m.attention_experts != len(models):
    raise ConfigError(f'model.attention_experts={m.attention_experts} must equal the '
                      f'{len(models)} dense models in init.upcycle_from (one expert each)')


def _validate_mla(m):
  """Checks the multi-head latent attention sizes."""
  for field in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
    if not m[field] > 0:
      raise ConfigError(f'model.{field}={m[field]} must be > 0 with model.attention=mla')
  if m.qk_rope_head_dim % 2:
    raise ConfigError(f'model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for rotary '
                      'embeddings')
  for field, off in (('qk_norm', 'none'), ('attention_bias', False)):
    if m[field] != off:
      raise ConfigError(f'model.{field}={m[field]!r} does not apply to model.attention=mla')


def _validate_rope_scaling(r):
  """Checks `model.rope_scaling` when a scaling type is set."""
  if r.type == 'none':
    return
  if not r.factor >= 1:
    raise ConfigError(f'model.rope_scaling.factor={r.factor} must be >= 1')
  if not r.original_max_seq_len > 0:
    raise ConfigError(f'model.rope_scaling.original_max_seq_len={r.original_max_seq_len} must '
                      f'be > 0 with model.rope_scaling.type={r.type}')
  if r.type == 'llama3' and not r.high_freq_factor > r.low_freq_factor > 0:
    raise ConfigError(f'model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed '
                      f'model.rope_scaling.low_freq_factor={r.low_freq_factor} > 0')


def _validate_moe(e, m, t):
  """Checks the routed-expert fields of a model with num_experts > 0."""
  choices = max(e.num_experts, e.router_outputs) + e.num_null_experts
  if not 1 <= e.top_k <= choices:
    null = (f' + model.moe.num_null_experts={e.num_null_experts}'
            if e.num_null_experts else '')
    raise ConfigError(f'model.moe.top_k={e.top_k} must be between 1 and '
                      f'model.moe.num_experts={e.num_experts}{null}')
  if e.first_dense_layers >= m.num_layers:
    raise ConfigError(f'model.moe.first_dense_layers={e.first_dense_layers} leaves no MoE '
                      f'layer among model.num_layers={m.num_layers}')
  if e.num_experts % e.num_groups:
    raise ConfigError(f'model.moe.num_experts={e.num_experts} must be divisible by '
                      f'model.moe.num_groups={e.num_groups}')
  if e.topk_groups > e.num_groups:
    raise ConfigError(f'model.moe.topk_groups={e.topk_groups} must be <= '
                      f'model.moe.num_groups={e.num_groups}')
  if e.num_groups > 1:
    if e.num_null_experts:
      raise ConfigError('model.moe.num_null_experts must be 0 with group-limited routing '
                        f'(model.moe.num_groups={e.num_groups})')
    if e.num_experts // e.num_groups < 2:
      raise ConfigError(f'model.moe.num_groups={e.num_groups} leaves fewer than 2 experts per '
                        'group; a group is scored by its top-2 experts')
    if e.topk_groups * (e.num_experts // e.num_groups) < e.top_k:
      raise ConfigError(f'model.moe.topk_groups={e.topk_groups} groups of '
                        f'{e.num_experts // e.num_groups} experts hold fewer than '
                        f'model.moe.top_k={e.top_k}')
  if e.bias_update_rate and e.num_null_experts:
    raise ConfigError('model.moe.bias_update_rate balances real experts only; it cannot be '
                      f'combined with model.moe.num_null_experts={e.num_null_experts}')
  if not 0 < e.top_p_threshold <= 1:
    raise ConfigError(f'model.moe.top_p_threshold={e.top_p_threshold} must be in (0, 1]')
  if e.router in ('top_p', 'expert_choice'):
    # Both choose by probability alone (top-p's slots past the threshold are its null experts).
    for field in ('num_null_experts', 'bias_update_rate'):
      if e[field]:
        raise ConfigError(f'model.moe.{field}={e[field]} does not apply to '
                          f'model.moe.router={e.router}')
    if e.num_groups > 1:
      raise ConfigError(f'model.moe.num_groups > 1 does not apply to model.moe.router={e.router}')
  if e.router == 'expert_choice':
    if e.capacity_factor == 0:
      raise ConfigError('model.moe.capacity_factor=0 (dropless) does not apply to '
                        'model.moe.router=expert_choice (each expert takes its capacity)')
    if t.sample_tokens:
      raise ConfigError(f'train.sample_tokens={t.sample_tokens}: model.moe.router='
                        'expert_choice looks at future tokens and cannot decode causally')
  if e.capacity_factor == 0 and e.dispatch != 'auto':
    raise ConfigError(f'model.moe.dispatch={e.dispatch} builds capacity buffers, but '
                      'model.moe.capacity_factor=0 routes dropless without any: leave '
                      'model.moe.dispatch=auto or set a capacity factor')
  if e.jitter >= 1:
    raise ConfigError(f'model.moe.jitter={e.jitter} must be < 1')
  _validate_compressed(e)


def _validate_compressed(e):
  """Checks the fields of merged experts (router_outputs) and dynamic skipping (skip_ratio)."""
  if e.skip_ratio >= 1:
    raise ConfigError(f'model.moe.skip_ratio={e.skip_ratio} must be < 1')
  if e.skip_ratio and e.router == 'expert_choice':
    raise ConfigError(f'model.moe.skip_ratio={e.skip_ratio} does not apply to '
                      'model.moe.router=expert_choice (tokens have no first choice)')
  if not e.router_outputs:
    return
  if e.router_outputs < e.num_experts:
    raise ConfigError(f'model.moe.router_outputs={e.router_outputs} must be >= '
                      f'model.moe.num_experts={e.num_experts} (or 0)')
  if e.router == 'expert_choice' or e.num_null_experts or e.num_groups > 1:
    raise ConfigError(f'model.moe.router_outputs={e.router_outputs} (merged experts) needs '
                      'top-k routing without null experts or expert groups')
