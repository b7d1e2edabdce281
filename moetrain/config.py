"""The one config schema: every field with its default and a comment, plus validation.

A config file (`configs/*.py`) defines `get_config()`, starts from `default_config()` and
overrides only what differs. Command-line overrides (`--config.model.top_k=4`) are applied on
top. `validate` runs before any device work and raises `ConfigError` naming the field.
"""

import argparse
import ast
import difflib
import importlib.util
import math
import os
import pathlib

import ml_collections

from moetrain import config_checks
from moetrain.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are ConfigErrors, so every command line reports them as one line
  and exits with status 2."""

  def error(self, message):
    raise ConfigError(message)


class CommandParser(ArgumentParser):
  """An ArgumentParser of a tool with subcommands: its errors name the (sub)command, since
  several subcommands share argument names."""

  def error(self, message):
    super().error(f'{self.prog}: {message}')


def parse_with_overrides(parser: argparse.ArgumentParser, argv):
  """(parsed arguments, the `--config.<field>=<value>` overrides); ConfigError naming any
  other unknown flag."""
  args, rest = parser.parse_known_args(argv)
  for flag in rest:
    if not flag.startswith('--config.'):
      raise ConfigError(f'unknown flag {flag.split("=")[0]} (overrides are '
                        '--config.<field>=<value>)')
  return args, rest


def default_config() -> ml_collections.ConfigDict:
  """Returns the locked schema with every field at its default."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 8000  # token ids; must cover the tokenizer's vocabulary
  m.d_model = 512  # residual stream width
  m.num_layers = 8  # transformer blocks
  m.num_heads = 8  # query heads
  m.num_kv_heads = 8  # key/value heads; fewer than num_heads gives grouped-query attention
  m.head_dim = 0  # per-head width; 0 means d_model // num_heads
  m.d_ff = 2048  # hidden width of the dense SwiGLU MLPs
  m.max_seq_len = 2048  # longest sequence the model is trained or sampled at
  m.rope_theta = 10000.0  # rotary position embedding base
  m.rope_scaling = r = ml_collections.ConfigDict()
  r.type = 'none'  # none | yarn (DeepSeek-V3) | llama3 (Llama 3.1): longer context than trained
  r.factor = 1.0  # context extension factor
  r.original_max_seq_len = 0  # context length of pretraining (yarn, llama3)
  r.beta_fast = 32.0  # yarn: rotations that mark the fully extrapolated frequencies
  r.beta_slow = 1.0  # yarn: rotations that mark the fully interpolated frequencies
  r.mscale = 1.0  # yarn: attention temperature coefficient of cos/sin
  r.mscale_all_dim = 0.0  # yarn: coefficient of the temperature; MLA also scales softmax by it
  r.low_freq_factor = 1.0  # llama3: wavelengths beyond original/low_freq_factor are interpolated
  r.high_freq_factor = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
  m.attention = 'mha'  # mha (multi/grouped-query heads) | mla (DeepSeek multi-head latent)
  m.attention_bias = False  # biases on the query, key and value projections (Qwen2)
  m.qk_norm = 'none'  # RMSNorm of queries and keys before RoPE: none | per_head (Qwen3)
  #                     | full (OLMoE: over the whole projection)
  # Attention experts (BAM, Zhang et al. 2024; docs/upcycle.md): A attentions of num_heads
  # heads each, all computed and mixed per token by a softmax router that starts uniform.
  m.attention_experts = 0  # A; 0: one plain attention. Upcycling takes expert m from model m
  m.attention_experts_share_kv = False  # one key/value projection shared by the A experts
  m.q_lora_rank = 0  # mla: rank of the query down-projection; 0 projects queries at full rank
  m.kv_lora_rank = 512  # mla: width of the compressed key/value latent
  m.qk_nope_head_dim = 128  # mla: per-head query/key width without rotary embedding
  m.qk_rope_head_dim = 64  # mla: per-head query/key width with rotary embedding (shared key)
  m.v_head_dim = 128  # mla: per-head value width
  m.tie_embeddings = True  # share the token embedding with the output layer
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.init_std = 0.02  # std of the normal initialiser of all projections
  m.dtype = 'float32'  # activation/compute dtype (router and loss always float32)
  m.param_dtype = 'float32'  # parameter storage dtype
  m.fp8 = 'none'  # FP8 matmuls of the projections, MLPs and experts (docs/fp8.md): none |
  #                 tensorwise (a scale per tensor) | blockwise (DeepSeek-V3's 1×128 and 128×128
  #                 blocks); router, embedding, output layer, norms, softmax and loss keep dtype
  m.scan_layers = False  # run identical blocks as one scanned stack (compile time flat in depth)
  m.scan_unroll = 1  # units per iteration of the scanned stack: XLA schedules across them
  # Pipeline parallelism (mesh.stage > 1) runs the main scanned stack (the MoE units; a dense
  # model's blocks) in stages: with repeats r > 1 each stage holds r slices of it, one per round
  # of a circular schedule, and the stack's weights are stored [r, units / r, ...].
  m.pipeline_repeats = 1  # 1: GPipe (one contiguous slice per stage); > 1: circular
  # Multi-token prediction (DeepSeek-V3, models/mtp.py): D modules after the last block,
  # module k predicting the token k + 1 ahead with the shared embedding and output head.
  # Training only: evaluation, generation and `moetrain.load` ignore them.
  m.mtp_layers = 0  # D, the prediction depth; 0: none
  m.mtp_loss_weight = 0.3  # λ: the objective adds λ × the mean of the depths' cross-entropies

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 8  # routed experts per MoE layer; 0 gives a dense model
  e.top_k = 2  # experts per token (null experts count among the k)
  e.d_expert = 0  # hidden width of each routed expert; 0 means model.d_ff
  e.num_shared_experts = 0  # always-on experts added to the routed output (DeepSeekMoE)
  e.d_shared_expert = 0  # hidden width of each shared expert; 0 means the routed width
  e.shared_expert_gate = False  # scale the shared output by sigmoid(x·w) (Qwen2-MoE)
  e.router = 'softmax'  # softmax | sigmoid (DeepSeek-V3) | expert_choice (experts pick tokens)
  #                      | top_p (experts by probability until their sum reaches the threshold)
  e.top_p_threshold = 0.4  # router=top_p: cumulative probability to reach, in (0, 1]; top_k caps
  #                          the experts a token takes
  e.dynamic_loss_weight = 0.0  # weight of the router-entropy loss (Huang et al. 2024's dynamic
  #                              loss: fewer experts per token under top_p)
  e.norm_topk_prob = True  # renormalise the chosen gate weights to sum to 1
  e.routed_scaling_factor = 1.0  # multiplies the routed gate weights (2.5 in DeepSeek-V3)
  e.num_groups = 1  # group-limited routing: experts split into this many equal groups
  e.topk_groups = 1  # groups kept per token (by the sum of their top-2 scores)
  e.bias_update_rate = 0.0  # auxiliary-loss-free balancing bias step; 0 disables the bias
  e.jitter = 0.0  # multiplicative router-input noise U(1-eps, 1+eps) in training (Switch)
  e.num_null_experts = 0  # zero-compute experts a token may choose (AdaMoE)
  e.router_outputs = 0  # merged experts (MC-SMoE): R >= num_experts router outputs, output r
  #                       computed by expert map[r] (a per-layer buffer); 0: one per expert
  e.skip_ratio = 0.0  # dynamic skipping outside training (Lu et al. 2024): later choices with a
  #                     gate below this × the first gate are not computed; 0: off, < 1
  e.aux_loss = 'local'  # load-balance statistics over: local | global | sequence | none
  e.aux_loss_weight = 0.01  # weight of the load-balancing loss
  e.z_loss_weight = 1e-3  # weight of the ST-MoE router z-loss
  e.group_size = 1  # sequences per dispatch group (capacity and dropping act per group)
  # Capacity per expert and dispatch group = ceil(cf·tokens·k/E); 0 routes dropless: every
  # choice computed, rows sorted by expert and grouped matmuls (no capacity buffers).
  e.capacity_factor = 1.25  # training capacity factor (>= 0; 0: dropless)
  e.eval_capacity_factor = 2.0  # capacity factor of periodic eval (>= 0; 0: dropless)
  e.min_capacity = 4  # lower bound of the per-expert capacity
  e.drop_policy = 'position'  # who overflows first: position (later choices, later tokens)
  #                             or priority (lowest top router probability first)
  e.dispatch = 'auto'  # builds capacity buffers: auto | capacity (gathers) | einsum (one-hot)
  # Expert parallelism: each device's dispatch groups go to the experts' owners in chunks, so
  # one chunk's exchange can overlap another's expert matmuls.
  e.exchange_chunks = 1  # per device and microbatch (divides its groups; 0: the cost model's)
  e.exchange_overlap = 'experts'  # what a chunk's exchange overlaps: experts (other chunks'
  #                                 expert matmuls) | block (each chunk runs the whole block,
  #                                 so also other chunks' attention and shared experts)
  e.exchange_dtype = ''  # tokens on the wire to the experts: '' (model.dtype) | float8_e4m3fn
  e.exchange_nodes = 0  # nodes the expert axis spans (two-level exchange); 0: from the devices
  e.layer_interval = 1  # every n-th block after the dense ones is an MoE block
  e.first_dense_layers = 0  # leading blocks that stay dense

  c.mesh = ml_collections.ConfigDict()
  c.mesh.stage = 1  # pipeline stages (outermost; may cross slices): each holds 1/stage of the
  #                   main layer stack and runs train.microbatches (>= stage) through it
  c.mesh.data = -1  # data-parallel axis; -1 takes the devices the other axes leave
  c.mesh.fsdp = 1  # parameter-sharded data-parallel axis
  c.mesh.expert = 1  # expert-parallel axis (also holds different data)
  c.mesh.tensor = 1  # tensor-parallel axis

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer steps
  t.batch_size = 16  # global batch, in sequences
  t.seq_len = 256  # tokens per sequence
  t.learning_rate = 3e-3  # peak learning rate
  t.warmup_steps = 100  # linear warmup from 0 to the peak
  t.schedule = 'cosine'  # cosine | constant, after warmup
  t.min_lr_ratio = 0.1  # cosine ends at learning_rate·min_lr_ratio
  t.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms and biases)
  t.adam_b1 = 0.9  # AdamW beta1
  t.adam_b2 = 0.95  # AdamW beta2
  t.grad_clip = 1.0  # global gradient norm clip; 0 disables
  t.seed = 0  # parameter init and data order
  t.log_every = 10  # steps between metrics records
  t.eval_every = 100  # steps between evals on the held-out split; 0 disables
  t.eval_batches = 8  # batches per eval
  t.sample_tokens = 0  # tokens sampled from the model after training; 0 disables
  t.microbatches = 1  # gradient accumulation: the batch runs as this many microbatches
  t.remat = 'none'  # per-block rematerialisation: none | full | save_dots (keep matmul outputs)
  t.document_mask = True  # packed documents attend only within themselves; False: across the
  #                         whole row, which GPUs can run with cuDNN's fused attention
  t.checkpoint_every = 1000  # steps between (asynchronous) checkpoints; 0: only at the end
  t.keep_checkpoints = 3  # the latest checkpoints kept; older ones are deleted
  t.permanent_every = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
  t.max_nonfinite_steps = 10  # consecutive non-finite steps (update skipped) before the run stops
  # A step (with its eval or checkpoint) that does not finish in time stops the run, every
  # thread's stack written into the workdir; the first step, which compiles, is never timed.
  t.step_timeout_s = 'auto'  # seconds > 0, or auto: 10 × the median step, at least 300 s
  t.heartbeat_timeout_s = 30.0  # a process silent this long (>= 10) is lost: all stop, one line
  t.profile_steps = 0  # JAX-profile this many steps (from the 2nd) into the workdir; 0: none

  c.init = i = ml_collections.ConfigDict()
  i.from_checkpoint = ''  # start from this checkpoint's weights (step 0, fresh optimizer)
  i.upcycle_from = ''  # dense checkpoint(s) to upcycle, comma-separated: one per expert group
  i.upcycle = 'copy'  # copy (every expert a copy) | drop (Drop-Upcycling) | granular (split)
  i.noise = 0.0  # std of noise added to copied expert weights, relative to each matrix's std
  i.drop_ratio = 0.5  # drop: fraction of each expert's hidden units re-initialised

  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'  # stdlib (the Python standard library's source) | text | jsonl | parquet
  #                      | tfds (a prepared array_record dataset, read without TensorFlow)
  d.path = ''  # text/jsonl/parquet: files or glob patterns, comma-separated
  d.text_field = 'text'  # jsonl/parquet/tfds: the field holding a document's text
  d.data_dir = ''  # tfds: the directory the dataset was prepared in
  d.tfds_name = ''  # tfds: dataset name(s), comma-separated
  d.weights = ''  # a mixture: one weight per path or TFDS name, comma-separated; empty: none
  d.split = 'train'  # tfds: the training split
  d.eval_split = 'eval'  # tfds: the held-out split (files: a fixed ~5% of them by hash)
  d.on_bad_record = 'error'  # error | skip (jsonl lines that do not parse, counted)
  d.workers = 2  # threads tokenizing documents ahead of the training step
  d.tokenizer = ''  # sentencepiece .model file; empty trains (once) and caches one

  c.lock()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked without devices; raises ConfigError."""
  config_checks.validate(config)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config()`; errors name the file."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'--config: file {path!r} not found')
  spec = importlib.util.spec_from_file_location(f'moetrain_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # any error in user code becomes one line naming the file
    raise ConfigError(f'--config: {path} failed to import: {_one_line(error)}') from error
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'--config: {path} does not define get_config()')
  try:
    config = module.get_config()
  except Exception as error:
    raise ConfigError(f'--config: {path}: get_config() failed: {_one_line(error)}') from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config: {path}: get_config() must return an ml_collections.ConfigDict')
  return config


def _one_line(error: Exception) -> str:
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  return f'{type(error).__name__}: {text.splitlines()[0] if text else ""}'


def apply_override(config: ml_collections.ConfigDict, flag: str) -> None:
  """Applies one `--config.a.b=value` flag, parsed as the type of the field it replaces."""
  name, sep, text = flag[len('--config.'):].partition('=')
  if not sep:
    raise ConfigError(f'{flag}: expected --config.<field>=<value>')
  *sections, key = name.split('.')
  node = config
  for section in sections:
    if not isinstance(node, ml_collections.ConfigDict) or section not in node:
      raise ConfigError(_unknown_field(config, name))
    node = node[section]
  if not isinstance(node, ml_collections.ConfigDict) or key not in node:
    raise ConfigError(_unknown_field(config, name))
  if isinstance(node[key], ml_collections.ConfigDict):
    raise ConfigError(f'--config.{name}: is a section, not a field')
  node[key] = _parse_value(name, text, node[key])


def _field_names(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _field_names(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def _unknown_field(config, name):
  # A high cutoff: every field of a section shares its prefix, which alone scores ~0.7.
  close = difflib.get_close_matches(name, list(_field_names(config)), n=1, cutoff=0.8)
  return f'--config.{name}: unknown field' + (f'; did you mean {close[0]}?' if close else '')


def _parse_value(name, text, current):
  kind = type(current)
  if kind is str:
    return text
  if kind is bool:
    if text.lower() in ('true', '1'):
      return True
    if text.lower() in ('false', '0'):
      return False
    raise ConfigError(f'--config.{name}={text}: expected a bool (true or false)')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = None
  if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    if math.isfinite(value):
      return float(value)
  if kind is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  raise ConfigError(f'--config.{name}={text}: expected {kind.__name__}')


# Fields that hold local paths or remote URLs (comma-separated lists entry by entry).
PATH_FIELDS = ('data.path', 'data.data_dir', 'data.tokenizer', 'init.from_checkpoint',
               'init.upcycle_from')


def _expand_path(entry: str) -> str:
  body = entry.lstrip()
  if '://' in body:  # gs://, s3://, ...: not the local shell's to expand
    return entry
  return entry[:len(entry) - len(body)] + os.path.expandvars(os.path.expanduser(body))


def expand_paths(config: ml_collections.ConfigDict) -> None:
  """Expands `~` and environment variables in the `PATH_FIELDS` (a shell does not expand `~`
  after `--config.data.path=`); remote URLs are left as they are."""
  for field in PATH_FIELDS:
    *sections, key = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[key] = ','.join(_expand_path(entry) for entry in node[key].split(','))


def with_overrides(config: ml_collections.ConfigDict, overrides=()) -> ml_collections.ConfigDict:
  """`config` with `--config.*` overrides applied and paths expanded, validated, including that
  every data field set is one `data.source` reads."""
  for flag in overrides:
    apply_override(config, flag)
  expand_paths(config)
  validate(config)
  # Not part of `validate`: checkpoints saved before this rule must still load for inference.
  config_checks.validate_source_fields(config.data, default_config().data)
  return config


def load(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads a config file and returns it `with_overrides`."""
  config = load_config_file(path)
  _check_schema(config, default_config(), path)
  return with_overrides(config, overrides)


def update_from_dict(config: ml_collections.ConfigDict, values: dict, source: str,
                     prefix: str = '') -> None:
  """Sets the fields `values` (e.g. a checkpoint's saved config) names; others keep their
  defaults. A field the schema lacks or a value of the wrong type raises ConfigError."""
  for key, value in values.items():
    field = f'{prefix}{key}'
    if key not in config:
      raise ConfigError(f'{source}: unknown config field {field}')
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f'{source}: config field {field} must be a section')
      update_from_dict(config[key], value, source, f'{field}.')
    elif not _same_kind(value, config[key]):
      raise ConfigError(f'{source}: config field {field}={value!r} must be '
                        f'{type(config[key]).__name__}')
    else:
      config[key] = float(value) if isinstance(config[key], float) else value


def _check_schema(config, schema, path, prefix=''):
  """Rejects fields the schema lacks and values of the wrong type in a config file."""
  for key in config:
    field = f'{prefix}{key}'
    if key not in schema:
      raise ConfigError(f'{path}: unknown field {field}')
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'{path}: {field} must be a section')
      _check_schema(value, default, path, f'{field}.')
    elif not _same_kind(value, default):
      raise ConfigError(f'{path}: {field}={value!r} must be {type(default).__name__}')
  for key in schema:
    if key not in config:
      raise ConfigError(f'{path}: missing field {prefix}{key}; start from default_config()')


def _same_kind(value, default):
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))
