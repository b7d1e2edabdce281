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
