"""The paper's configs: parameter counts (Table 2) by abstract evaluation, and config errors."""

import importlib

import pytest

from llama_jax import experiment
from llama_jax import model as model_lib
from llama_jax.errors import ConfigError


def model_config(name, **overrides):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.update(overrides)
  return model_lib.ModelConfig.from_config(config.model)


@pytest.mark.parametrize('name,params,hidden', [
    ('llama_7b', 6_738_415_616, 11008),
    ('llama_13b', 13_015_864_320, 13824),
    ('llama_33b', 32_528_943_616, 17920),
    ('llama_65b', 65_285_660_672, 22016),
])
def test_paper_parameter_counts(name, params, hidden):
  config = model_config(name)
  assert config.hidden_dim == hidden
  assert model_lib.count_params(model_lib.abstract_model(config)) == params


@pytest.mark.parametrize('name,params,hidden,kv_heads,tied', [
    ('llama2_7b', 6_738_415_616, 11008, 32, False),
    ('llama2_13b', 13_015_864_320, 13824, 40, False),
    ('llama2_70b', 68_976_648_192, 28672, 8, False),
    ('llama3_8b', 8_030_261_248, 14336, 8, False),
    ('llama3_70b', 70_553_706_496, 28672, 8, False),
    ('llama3_405b', 405_853_388_800, 53248, 8, False),
    ('llama3_2_1b', 1_235_814_400, 8192, 8, True),
    ('llama3_2_3b', 3_212_749_824, 8192, 8, True),
])
def test_llama2_and_3_parameter_counts(name, params, hidden, kv_heads, tied):
  config = model_config(name)
  assert (config.hidden_dim, config.kv_heads, config.tie_embeddings) == (hidden, kv_heads, tied)
  assert model_lib.count_params(model_lib.abstract_model(config)) == params
  if name.startswith('llama3'):
    assert config.rope_theta == 500_000 and config.rope_scaling.type == 'llama3'
    assert config.vocab_size == 128_256 and config.max_seq_len == 131_072


def test_tiny_and_small_sizes():
  tiny = model_lib.count_params(model_lib.abstract_model(model_config('tiny')))
  small = model_lib.count_params(model_lib.abstract_model(model_config('small')))
  assert 1e6 < tiny < 10e6
  assert 100e6 < small < 1.5e9


@pytest.mark.parametrize('overrides,words', [
    (dict(dim=100, n_heads=3), ['model.dim', 'model.n_heads']),
    (dict(n_heads=32, n_kv_heads=5), ['model.n_kv_heads']),
    (dict(attention='flash'), ['model.attention', 'blockwise']),
    (dict(remat='some'), ['model.remat', 'save_dots']),
    (dict(dtype='int8'), ['model.dtype', 'bfloat16']),
    (dict(n_layers=0), ['model.n_layers']),
    (dict(rope_scaling=dict(type='yarn', factor=2.0)), ['model.rope_scaling', 'llama3', 'linear']),
    (dict(rope_scaling=dict(type='linear', factor=2.0, low_freq_factor=1.0)), ['low_freq_factor']),
    (dict(rope_scaling=dict(type='llama3', factor=8.0)), ['original_max_position_embeddings']),
])
def test_bad_model_config_is_one_clear_sentence(overrides, words):
  with pytest.raises(ConfigError) as error:
    model_config('tiny', **overrides)
  message = str(error.value)
  assert all(word in message for word in words), message
  assert '\n' not in message


def test_unknown_model_key_is_named():
  config = importlib.import_module('configs.tiny').get_config()
  config.model.unlock()
  config.model.n_layer = 3
  with pytest.raises(ConfigError, match='n_layer'):
    model_lib.ModelConfig.from_config(config.model)


def test_conversations_without_segment_mask_are_refused():
  """Packed conversations must not attend to each other: segment_mask=False is refused."""
  config = importlib.import_module('configs.tiny_sft').get_config()
  mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)
  experiment.validate(config, mesh, 'cpu')  # the demo as shipped is accepted
  config.data.segment_mask = False
  with pytest.raises(ConfigError, match='stdlib_qa .*data.segment_mask=True'):
    experiment.validate(config, mesh, 'cpu')
