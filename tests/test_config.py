"""The config schema, config files and `--config.*` overrides."""

import pytest

from moetrain import config as config_lib
from moetrain.errors import ConfigError


def write(tmp_path, body, name='cfg.py'):
  path = tmp_path / name
  path.write_text(body)
  return str(path)


def test_every_field_has_a_comment():
  source = open(config_lib.__file__).read()
  config = config_lib.default_config()
  for section in ('model', 'model.moe', 'model.rope_scaling', 'mesh', 'train', 'data', 'init'):
    node = config
    for key in section.split('.'):
      node = node[key]
    for key, value in node.items():
      if hasattr(value, 'items'):
        continue
      lines = [line for line in source.splitlines()
               if f'.{key} = ' in line and 'ConfigDict()' not in line]
      assert lines and all('#' in line for line in lines), f'{section}.{key} lacks a comment'


def test_tiny_config_loads_and_validates():
  config = config_lib.load('configs/tiny.py')
  assert config.model.moe.num_experts == 8 and config.model.d_model == 128


def test_overrides_are_typed():
  config = config_lib.load('configs/tiny.py', ['--config.model.moe.top_k=1',
                                               '--config.train.learning_rate=1e-3',
                                               '--config.model.moe.capacity_factor=2',
                                               '--config.model.tie_embeddings=false',
                                               '--config.model.dtype=bfloat16'])
  assert config.model.moe.top_k == 1
  assert config.train.learning_rate == 1e-3
  assert config.model.moe.capacity_factor == 2.0
  assert isinstance(config.model.moe.capacity_factor, float)
  assert config.model.tie_embeddings is False
  assert config.model.dtype == 'bfloat16'


@pytest.mark.parametrize('flag, message', [
    ('--config.model.nope=3', '--config.model.nope: unknown field'),
    ('--config.nope.top_k=3', '--config.nope.top_k: unknown field'),
    ('--config.model.moe.top_k=abc', '--config.model.moe.top_k=abc: expected int'),
    ('--config.model.moe.top_k=2.5', '--config.model.moe.top_k=2.5: expected int'),
    ('--config.train.learning_rate=fast', 'expected float'),
    ('--config.model.tie_embeddings=maybe', 'expected a bool'),
    ('--config.model=3', '--config.model: is a section'),
    ('--config.model.moe.top_k', 'expected --config.<field>=<value>'),
])
def test_bad_overrides_name_the_field(flag, message):
  with pytest.raises(ConfigError, match=message.replace('.', r'\.').replace('<', '.').replace(
      '>', '.')):
    config_lib.load('configs/tiny.py', [flag])


@pytest.mark.parametrize('flag, message', [
    ('--config.model.moe.top_k=9', 'model.moe.top_k=9 must be between 1 and model.moe.num_experts=8'),
    ('--config.model.moe.dispatch=magic', 'model.moe.dispatch=.magic. must be one of'),
    ('--config.model.num_kv_heads=3', 'model.num_heads=4 must be a multiple of model.num_kv_heads=3'),
    ('--config.train.batch_size=0', 'train.batch_size=0 must be > 0'),
    ('--config.model.moe.group_size=3', 'train.batch_size=16 must be divisible by model.moe.group_size=3'),
    ('--config.train.seq_len=512', 'train.seq_len=512 exceeds model.max_seq_len=256'),
    ('--config.mesh.fsdp=-1', 'at most one of mesh'),
])
def test_validation_names_the_fields(flag, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load('configs/tiny.py', [flag])


def test_config_file_errors_name_the_file(tmp_path):
  with pytest.raises(ConfigError, match="file 'missing.py' not found"):
    config_lib.load('missing.py')
  no_get = write(tmp_path, 'X = 1\n')
  with pytest.raises(ConfigError, match='does not define get_config'):
    config_lib.load(no_get)
  broken = write(tmp_path, 'import nonexistent_module\n')
  with pytest.raises(ConfigError, match='failed to import: ModuleNotFoundError'):
    config_lib.load(broken)
  typo = write(tmp_path, 'from moetrain.config import default_config\n'
               'def get_config():\n  c = default_config()\n  c.model.topk = 1\n  return c\n')
  with pytest.raises(ConfigError, match='get_config.. failed: AttributeError: .*topk'):
    config_lib.load(typo)
  wrong_type = write(tmp_path, 'from moetrain.config import default_config\n'
                     'def get_config():\n  c = default_config()\n'
                     '  c.model.moe.num_experts = 2.5\n  return c\n')
  with pytest.raises(ConfigError, match='num_experts'):
    config_lib.load(wrong_type)


def test_dense_model_needs_no_moe_checks():
  config = config_lib.load('configs/tiny.py', ['--config.model.moe.num_experts=0',
                                               '--config.model.moe.top_k=5'])
  assert config.model.moe.num_experts == 0


@pytest.mark.parametrize('flags, message', [
    (['--config.model.moe.num_groups=4', '--config.model.moe.topk_groups=5'],
     'model.moe.topk_groups=5 must be <= model.moe.num_groups=4'),
    (['--config.model.moe.num_groups=3'],
     'model.moe.num_experts=8 must be divisible by model.moe.num_groups=3'),
    (['--config.model.moe.num_null_experts=2', '--config.model.moe.top_k=11'],
     'model.moe.top_k=11 must be between 1 and model.moe.num_experts=8 '
     r'\+ model.moe.num_null_experts=2'),
    (['--config.model.moe.num_groups=4', '--config.model.moe.topk_groups=1',
      '--config.model.moe.top_k=3'], 'model.moe.topk_groups=1 groups of 2 experts hold fewer'),
    (['--config.model.moe.router=expert_choice', '--config.model.moe.capacity_factor=0'],
     r'capacity_factor=0 \(dropless\) does not apply to model.moe.router=expert_choice'),
    (['--config.model.moe.router=expert_choice'],
     'train.sample_tokens=120: model.moe.router=expert_choice looks at future tokens'),
    (['--config.model.moe.bias_update_rate=0.001', '--config.model.moe.num_null_experts=1'],
     'bias_update_rate balances real experts only'),
])
def test_invalid_routing_combinations_name_the_fields(flags, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load('configs/tiny.py', flags)


def test_null_experts_allow_top_k_up_to_all_choices():
  config = config_lib.load('configs/tiny.py', ['--config.model.moe.num_null_experts=2',
                                               '--config.model.moe.top_k=10'])
  assert config.model.moe.top_k == 10


@pytest.mark.parametrize('flag, message', [
    ('--config.train.stpes=5', '--config.train.stpes: unknown field; did you mean train.steps?'),
    ('--config.modle.d_model=4',
     '--config.modle.d_model: unknown field; did you mean model.d_model?'),
    ('--config.model.moe.topk=1',
     '--config.model.moe.topk: unknown field; did you mean model.moe.top_k?'),
    ('--config.model.nope=3', '--config.model.nope: unknown field'),
])
def test_a_misspelt_override_suggests_the_closest_field(flag, message):
  with pytest.raises(ConfigError) as error:
    config_lib.load('configs/tiny.py', [flag])
  assert str(error.value) == message


@pytest.mark.parametrize('flags, message', [
    (['--config.data.path=corpus.jsonl'],
     "data.path='corpus.jsonl' is set but data.source=stdlib does not read it: set data.source "
     'to text, jsonl or parquet to read it, or leave data.path empty'),
    (['--config.data.source=text', '--config.data.path=docs', '--config.data.text_field=body'],
     "data.text_field='body' is set but data.source=text does not read it: set data.source to "
     "jsonl, parquet or tfds to read it, or leave data.text_field at 'text'"),
    (['--config.data.source=tfds', '--config.data.tfds_name=c4', '--config.data.path=x.jsonl'],
     "data.path='x.jsonl' is set but data.source=tfds"),
    (['--config.data.source=jsonl', '--config.data.path=a.jsonl', '--config.data.data_dir=d'],
     "data.data_dir='d' is set but data.source=jsonl does not read it: set data.source to tfds"),
    (['--config.data.source=parquet', '--config.data.path=a.parquet',
      '--config.data.on_bad_record=skip'],
     "data.on_bad_record='skip' is set but data.source=parquet does not read it: set "
     'data.source to jsonl'),
])
def test_a_data_field_the_source_does_not_read_is_refused(flags, message):
  with pytest.raises(ConfigError) as error:
    config_lib.load('configs/tiny.py', flags)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_the_fields_of_each_source_are_accepted_with_it():
  jsonl = config_lib.load('configs/tiny.py', [
      '--config.data.source=jsonl', '--config.data.path=a.jsonl', '--config.data.text_field=t',
      '--config.data.on_bad_record=skip', '--config.data.workers=4'])
  assert jsonl.data.on_bad_record == 'skip'
  tfds = config_lib.load('configs/tiny.py', [
      '--config.data.source=tfds', '--config.data.tfds_name=a,b', '--config.data.data_dir=d',
      '--config.data.weights=1,2', '--config.data.split=train[:90%]'])
  assert tfds.data.split == 'train[:90%]'


def test_path_fields_expand_home_and_environment_variables_but_not_urls(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('CORPUS', '/data/corpus')
  config = config_lib.load('configs/tiny.py', [
      '--config.data.source=jsonl', '--config.data.path=~/a.jsonl, $CORPUS/*.jsonl,gs://b/$X/~c',
      '--config.data.tokenizer=${CORPUS}/tok.model', '--config.init.upcycle_from=~/dense'])
  assert config.data.path == f'{tmp_path}/a.jsonl, /data/corpus/*.jsonl,gs://b/$X/~c'
  assert config.data.tokenizer == '/data/corpus/tok.model'
  assert config.init.upcycle_from == f'{tmp_path}/dense'
  tfds = config_lib.load('configs/tiny.py', [
      '--config.data.source=tfds', '--config.data.tfds_name=c4', '--config.data.data_dir=~/tfds'])
  assert tfds.data.data_dir == f'{tmp_path}/tfds'
  # A path set in a config file is expanded as well.
  warm = write(tmp_path, 'from moetrain.config import default_config\n'
               'def get_config():\n  c = default_config()\n'
               "  c.init.from_checkpoint = '~/runs/a'\n  return c\n")
  assert config_lib.load(warm).init.from_checkpoint == f'{tmp_path}/runs/a'


def test_every_path_field_is_a_string_field_of_the_schema():
  config = config_lib.default_config()
  for field in config_lib.PATH_FIELDS:
    section, key = field.split('.')
    assert isinstance(config[section][key], str), field


SCANNED = ['--config.model.scan_layers=true']


@pytest.mark.parametrize('flags, message', [
    (['--config.mesh.stage=2', '--config.train.microbatches=2'],
     r'mesh.stage=2 needs model.scan_layers=True'),
    ([*SCANNED, '--config.mesh.stage=3', '--config.train.microbatches=4'],
     r'the 4 units of the main layer stack must split over mesh.stage=3 × '
     r'model.pipeline_repeats=1'),
    ([*SCANNED, '--config.mesh.stage=2', '--config.model.pipeline_repeats=4',
      '--config.train.microbatches=2'],
     r'the 4 units of the main layer stack must split over mesh.stage=2 × '
     r'model.pipeline_repeats=4'),
    ([*SCANNED, '--config.model.pipeline_repeats=3'],
     r'model.pipeline_repeats=3 must divide the 4 units'),
    ([*SCANNED, '--config.mesh.stage=4', '--config.train.microbatches=2'],
     r'train.microbatches=2 must be >= mesh.stage=4'),
    ([*SCANNED, '--config.mesh.stage=4', '--config.train.microbatches=6',
      '--config.train.batch_size=24', '--config.model.num_layers=8'],
     r'train.microbatches=6 must be a multiple of mesh.stage=4'),
])
def test_pipeline_stages_name_the_fields(flags, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load('configs/tiny.py', flags)
