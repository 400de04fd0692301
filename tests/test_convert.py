"""Parity with Hugging Face transformers (PyTorch) and Meta's checkpoint layout."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from test_tokenizers import _build_llama3_like

from llama_jax import convert, generate
from llama_jax import model as model_lib
from llama_jax.errors import UserError


def our_model(folder):
  config, params = convert.read_orbax(folder)
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  return model


def tokens(shape=(2, 24), seed=0):
  return np.random.default_rng(seed).integers(0, 102, shape)


def assert_same_logits(ours, hf_model):
  ids = tokens()
  logits, _ = ours(ids)
  with torch.no_grad():
    want = hf_model(torch.tensor(ids)).logits.numpy()
  assert np.abs(want).max() > 1.0  # logits big enough for the comparison to mean something
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('n_kv_heads,rope_theta', [(4, 10000.0), (2, 500000.0), (1, 1234.5)])
def test_hugging_face_logits_match(tmp_path, n_kv_heads, rope_theta, make_hf_model):
  hf_model = make_hf_model(tmp_path / 'hf', n_kv_heads, rope_theta)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'))
  assert_same_logits(our_model(str(tmp_path / 'ours')), hf_model)


def test_old_style_rope_theta_key(tmp_path, make_hf_model):
  hf_model = make_hf_model(tmp_path / 'hf', 2, 2500.0)
  path = tmp_path / 'hf' / 'config.json'
  config = json.loads(path.read_text())
  config['rope_theta'] = config.pop('rope_parameters')['rope_theta']
  path.write_text(json.dumps(config))
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'))
  assert_same_logits(our_model(str(tmp_path / 'ours')), hf_model)


def test_round_trip_hf_orbax_hf_is_identical(tmp_path, make_hf_model):
  make_hf_model(tmp_path / 'hf', 2)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'))
  convert.write_hf(*convert.read_orbax(str(tmp_path / 'ours')), str(tmp_path / 'back'))
  original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  back = {}
  for path in (tmp_path / 'back').glob('*.safetensors'):  # one file per layer
    back.update(load_file(str(path)))
  assert set(original) == set(back)
  for name in original:
    np.testing.assert_array_equal(back[name], original[name], err_msg=name)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'back')).eval()
  assert_same_logits(our_model(str(tmp_path / 'ours')), reloaded)


def write_meta_checkpoint(hf_model, folder, shards=2):
  """Meta's layout: interleaved rotary pairs, matrices split across model-parallel files."""
  config = hf_model.config
  heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}

  def interleave(w, n):  # the inverse of convert._interleaved_to_rotate_half
    out_dim, in_dim = w.shape
    return w.reshape(n, 2, out_dim // n // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)

  meta = {
      'tok_embeddings.weight': (state['model.embed_tokens.weight'], 1),
      'norm.weight': (state['model.norm.weight'], None),
      'output.weight': (state['lm_head.weight'], 0)
  }
  for i in range(config.num_hidden_layers):
    hf = lambda name: state[f'model.layers.{i}.{name}.weight']
    meta.update({
        f'layers.{i}.attention.wq.weight': (interleave(hf('self_attn.q_proj'), heads), 0),
        f'layers.{i}.attention.wk.weight': (interleave(hf('self_attn.k_proj'), kv_heads), 0),
        f'layers.{i}.attention.wv.weight': (hf('self_attn.v_proj'), 0),
        f'layers.{i}.attention.wo.weight': (hf('self_attn.o_proj'), 1),
        f'layers.{i}.feed_forward.w1.weight': (hf('mlp.gate_proj'), 0),
        f'layers.{i}.feed_forward.w3.weight': (hf('mlp.up_proj'), 0),
        f'layers.{i}.feed_forward.w2.weight': (hf('mlp.down_proj'), 1),
        f'layers.{i}.attention_norm.weight': (hf('input_layernorm'), None),
        f'layers.{i}.ffn_norm.weight': (hf('post_attention_layernorm'), None),
    })
  os.makedirs(folder)
  for shard in range(shards):
    tensors = {
        name: torch.tensor(w if axis is None else np.split(w, shards, axis)[shard])
        for name, (w, axis) in meta.items()
    }
    torch.save(tensors, os.path.join(folder, f'consolidated.{shard:02d}.pth'))
  with open(os.path.join(folder, 'params.json'), 'w') as f:
    json.dump(
        {
            'dim': 64,
            'n_layers': 2,
            'n_heads': heads,
            'n_kv_heads': kv_heads,
            'vocab_size': -1,
            'multiple_of': 16,
            'norm_eps': 1e-5,
            'rope_theta': config.rope_parameters['rope_theta']
        }, f)


def test_meta_two_shard_checkpoint_matches_hugging_face(tmp_path, make_hf_model):
  hf_model = make_hf_model(tmp_path / 'hf', n_kv_heads=2, rope_theta=5000.0)
  hf_model.config.vocab_size = 102
  write_meta_checkpoint(hf_model, str(tmp_path / 'meta'))
  convert.write_orbax(*convert.read_meta(str(tmp_path / 'meta')), str(tmp_path / 'ours'))
  assert_same_logits(our_model(str(tmp_path / 'ours')), hf_model)


def test_greedy_generation_matches_transformers(tmp_path, make_hf_model):
  hf_model = make_hf_model(tmp_path / 'hf', 2)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'))
  ours = our_model(str(tmp_path / 'ours'))
  prompts = [[1, 17, 33, 60, 9, 81], [1, 5, 99]]  # different lengths: left padding
  got = generate.generate(ours, prompts, generate.Sampling(max_new_tokens=10), stop_ids=[2])
  for prompt, generated in zip(prompts, got):
    with torch.no_grad():
      want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    want = want[:want.index(2)] if 2 in want else want
    assert generated == want


def snapshot(folder):
  return {p: os.stat(os.path.join(folder, p)).st_mtime_ns for p in sorted(os.listdir(folder))}


def test_bad_sources_are_clear_errors_and_stay_untouched(tmp_path, make_hf_model):
  hf_model = make_hf_model(tmp_path / 'hf')
  path = tmp_path / 'hf' / 'config.json'
  config = json.loads(path.read_text())
  config.update(model_type='gpt2', architectures=['GPT2LMHeadModel'])
  path.write_text(json.dumps(config))
  before = snapshot(tmp_path / 'hf')
  with pytest.raises(UserError, match='not LlamaForCausalLM'):
    convert.read_hf(str(tmp_path / 'hf'))
  assert snapshot(tmp_path / 'hf') == before

  write_meta_checkpoint(hf_model, str(tmp_path / 'meta'), shards=2)
  os.remove(tmp_path / 'meta' / 'consolidated.01.pth')
  with pytest.raises(UserError, match='Are shards of .* missing'):
    convert.read_meta(str(tmp_path / 'meta'))
  os.rename(tmp_path / 'meta' / 'consolidated.00.pth', tmp_path / 'meta' / 'consolidated.01.pth')
  with pytest.raises(UserError, match='none missing'):
    convert.read_meta(str(tmp_path / 'meta'))
  with pytest.raises(UserError, match='no config.json'):
    convert.read_hf(str(tmp_path / 'meta'))


# Llama 3.x at test size: head_dim 32 gives rotary wavelengths of 6, 14, 33, 75... so with
# original_max_position_embeddings 32 one pair is kept, one blended and the rest divided,
# and positions up to 95 go well past the original context.
LLAMA3 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=102, max_position_embeddings=128, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=[2, 3])
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
SHAPES = {
    'llama3.1': dict(LLAMA3, rope_parameters=LLAMA3_ROPE),
    'llama3.2': dict(LLAMA3, rope_parameters=dict(LLAMA3_ROPE, factor=32.0),
                     tie_word_embeddings=True),
    'llama2': dict(LLAMA3, num_key_value_heads=4, eos_token_id=2,
                   rope_parameters=dict(rope_type='default', rope_theta=10000.0)),
    'linear': dict(LLAMA3, rope_parameters=dict(rope_type='linear', rope_theta=10000.0,
                                                factor=4.0)),
}


def make_hf(folder, shape, seed=0, **overrides):
  """A random LlamaForCausalLM of one of SHAPES, saved in `folder` with tokenizer files."""
  config = transformers.LlamaConfig(**{**SHAPES[shape], **overrides})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_(1 + 0.2 * torch.randn_like(param) if 'norm' in name else 0.1 *
                  torch.randn_like(param))
  model.save_pretrained(folder)
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    (folder / name).write_text(json.dumps({'made by': 'the test', 'name': name}))
  return model


def long_tokens(seed=0):
  return np.random.default_rng(seed).integers(0, 102, (2, 96))


def assert_same_long_logits(ours, hf_model, ids=None):
  ids = long_tokens() if ids is None else ids
  logits, _ = ours(ids)
  with torch.no_grad():
    want = hf_model(torch.tensor(ids)).logits.numpy()
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)
  return np.asarray(logits)


@pytest.mark.parametrize('shape', list(SHAPES))
def test_llama_families_match_transformers(tmp_path, shape):
  hf_model = make_hf(tmp_path / 'hf', shape)
  config, params = convert.read_hf(str(tmp_path / 'hf'))
  assert config.tie_embeddings == (shape == 'llama3.2')
  assert 'output' not in params if config.tie_embeddings else 'output' in params
  convert.write_orbax(config, params, str(tmp_path / 'ours'), tokenizer_from=str(tmp_path / 'hf'))
  ours = our_model(str(tmp_path / 'ours'))
  logits = assert_same_long_logits(ours, hf_model)
  if shape != 'llama2':  # the scaling matters at these positions
    plain = model_lib.Transformer(dataclasses.replace(config, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(ours, nnx.Param))
    assert np.abs(np.asarray(plain(long_tokens())[0]) - logits).max() > 1e-2
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    assert (tmp_path / 'ours' / 'tokenizer' / name).read_text() == (tmp_path / 'hf' /
                                                                    name).read_text()


@pytest.mark.parametrize('shape', ['llama3.1', 'llama3.2'])
def test_round_trip_keeps_rope_scaling_and_tie(tmp_path, shape):
  make_hf(tmp_path / 'hf', shape)
  _build_llama3_like(str(tmp_path / 'hf'))  # a real tokenizer: the export writes its BOS, end ids
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'),
                      tokenizer_from=str(tmp_path / 'hf'))
  convert.write_hf(*convert.read_orbax(str(tmp_path / 'ours')), str(tmp_path / 'back'),
                   tokenizer_from=str(tmp_path / 'ours' / 'tokenizer'))
  original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  back = {}
  for path in (tmp_path / 'back').glob('*.safetensors'):
    back.update(load_file(str(path)))
  assert set(original) == set(back)
  assert ('lm_head.weight' in back) == (shape == 'llama3.1')
  for name in original:
    np.testing.assert_array_equal(back[name], original[name], err_msg=name)
  assert (tmp_path / 'back' / 'tokenizer.json').read_text() == (tmp_path / 'hf' /
                                                                'tokenizer.json').read_text()
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'back')).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'back'))
  assert reloaded.config.bos_token_id == hf_tokenizer.bos_token_id
  end_ids = hf_tokenizer.convert_tokens_to_ids(['<|end_of_text|>', '<|eom_id|>', '<|eot_id|>'])
  assert reloaded.config.eos_token_id[0] == hf_tokenizer.eos_token_id
  assert sorted(reloaded.config.eos_token_id) == sorted(end_ids)
  want = SHAPES[shape]['rope_parameters']
  assert {k: reloaded.config.rope_parameters[k] for k in want} == want
  assert reloaded.config.tie_word_embeddings == (shape == 'llama3.2')
  assert_same_long_logits(our_model(str(tmp_path / 'ours')), reloaded)


@pytest.mark.parametrize('shape', ['llama3.1', 'llama3.2'])
def test_greedy_generation_stops_on_any_end_id(tmp_path, shape):
  hf_model = make_hf(tmp_path / 'hf', shape)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'ours'))
  ours = our_model(str(tmp_path / 'ours'))
  prompts = [list(long_tokens(seed)[0, :n]) for seed, n in ((1, 40), (2, 7), (3, 23))]
  # End ids the model actually produces, so that stopping is exercised: its own greedy picks.
  free = generate.generate(ours, prompts, generate.Sampling(max_new_tokens=40), stop_ids={-1})
  stop_ids = {free[0][5], free[1][9]}
  got = generate.generate(ours, prompts, generate.Sampling(max_new_tokens=40), stop_ids=stop_ids)
  for prompt, generated in zip(prompts, got):
    with torch.no_grad():
      want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                               eos_token_id=sorted(stop_ids),
                               pad_token_id=0)[0, len(prompt):].tolist()
    ends = [i for i, token in enumerate(want) if token in stop_ids]
    assert generated == (want[:ends[0]] if ends else want)
  assert len(got[0]) <= 5 and len(got[1]) <= 9


def write_meta_llama3(hf_model, folder, shards=2):
  """Meta's Llama 3.1 layout: interleaved rotary pairs, model-parallel shards, params.json
  with use_scaled_rope (Meta's fixed constants), and a tokenizer.model beside them."""
  write_meta_checkpoint(hf_model, str(folder), shards)
  config = hf_model.config
  (folder / 'params.json').write_text(
      json.dumps({
          'dim': config.hidden_size,
          'n_layers': config.num_hidden_layers,
          'n_heads': config.num_attention_heads,
          'n_kv_heads': config.num_key_value_heads,
          'vocab_size': config.vocab_size,
          **convert._ffn_keys(config.hidden_size, config.intermediate_size), 'norm_eps':
              config.rms_norm_eps,
          'rope_theta': config.rope_parameters['rope_theta'],
          'use_scaled_rope': True
      }))
  (folder / 'tokenizer.model').write_text('a tiktoken file, made by the test')


def test_meta_llama3_matches_the_hugging_face_route(tmp_path):
  # Meta's scaled rope has fixed constants: factor 8, low 1, high 4, original context 8192.
  rope_parameters = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)
  hf_model = make_hf(tmp_path / 'hf', 'llama3.1', rope_parameters=rope_parameters)
  write_meta_llama3(hf_model, tmp_path / 'meta')
  meta_config, meta_params = convert.read_meta(str(tmp_path / 'meta'))
  hf_config, _ = convert.read_hf(str(tmp_path / 'hf'))
  assert meta_config.rope_scaling == hf_config.rope_scaling
  assert meta_config.kv_heads == 2 and meta_config.vocab_size == 102
  convert.write_orbax(meta_config, meta_params, str(tmp_path / 'ours'),
                      tokenizer_from=str(tmp_path / 'meta'))
  assert (tmp_path / 'ours' / 'tokenizer' / 'tokenizer.model').exists()
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'via_hf'))
  from_meta, from_hf = our_model(str(tmp_path / 'ours')), our_model(str(tmp_path / 'via_hf'))
  assert_same_long_logits(from_meta, hf_model)
  # Positions far beyond 8192, where the scaled frequencies matter: the same as the HF route.
  # (transformers' float32 angles at 20000 differ from any other float32 computation by more
  # than 1e-4 in the logits, so there the comparison is between the two routes.)
  ids = long_tokens()
  positions = np.broadcast_to(20000 + np.arange(96), ids.shape)
  np.testing.assert_allclose(np.asarray(from_meta(ids, positions)[0]),
                             np.asarray(from_hf(ids, positions)[0]), atol=1e-5, rtol=0)


# Published params.json files (Meta's downloads) and the rope factor of the same model's Hugging
# Face config.json: Llama 3.1 8B and 70B use 8, Llama 3.2 1B and 3B use 32.
META_PARAMS = {
    8.0: [
        dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8),
        dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8)
    ],
    32.0: [
        dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8),
        dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8)
    ],
}


@pytest.mark.parametrize('factor', sorted(META_PARAMS))
def test_meta_scaled_rope_factor_is_the_model_cards(factor):
  for shape in META_PARAMS[factor]:
    meta = dict(shape, vocab_size=128256, rope_theta=500000.0, use_scaled_rope=True)
    assert convert.meta_rope_scaling(meta).factor == factor
    assert convert.meta_rope_scaling(dict(meta, use_scaled_rope=False)) is None


def one_sentence_and_nothing_written(call, match, out):
  with pytest.raises(UserError, match=match) as error:
    call()
  assert '\n' not in str(error.value) and str(error.value).endswith('.')
  assert not out.exists() or not any(out.iterdir())


def test_llama3_bad_inputs_are_one_sentence_and_write_nothing(tmp_path):
  make_hf(tmp_path / 'hf', 'llama3.1')
  config_path = tmp_path / 'hf' / 'config.json'
  good = json.loads(config_path.read_text())
  out = tmp_path / 'out'

  def convert_hf():
    convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(out),
                        tokenizer_from=str(tmp_path / 'hf'))

  config_path.write_text(
      json.dumps({
          **good, 'rope_parameters': dict(LLAMA3_ROPE, rope_type='yarn')
      }))
  one_sentence_and_nothing_written(convert_hf, "rope scaling 'yarn' is not supported", out)
  old_style = {k: v for k, v in good.items() if k != 'rope_parameters'}
  config_path.write_text(
      json.dumps({
          **old_style, 'rope_scaling': {
              'type': 'dynamic',
              'factor': 2.0
          }
      }))
  one_sentence_and_nothing_written(convert_hf, "rope scaling 'dynamic'", out)
  config_path.write_text(
      json.dumps({
          **good, 'model_type': 'mistral',
          'architectures': ['MistralForCausalLM']
      }))
  one_sentence_and_nothing_written(convert_hf, 'not LlamaForCausalLM', out)

  # A tied checkpoint (no lm_head) whose config claims untied embeddings.
  make_hf(tmp_path / 'tied', 'llama3.2')
  tied_config = tmp_path / 'tied' / 'config.json'
  tied_config.write_text(
      json.dumps({
          **json.loads(tied_config.read_text()), 'tie_word_embeddings': False
      }))
  one_sentence_and_nothing_written(
      lambda: convert.write_orbax(*convert.read_hf(str(tmp_path / 'tied')), str(out)),
      'lm_head.weight is missing', out)

  # An Orbax checkpoint of tied parameters whose saved config says untied.
  tied_config.write_text(
      json.dumps({
          **json.loads(tied_config.read_text()), 'tie_word_embeddings': True
      }))
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'tied')), str(tmp_path / 'orbax'))
  saved = tmp_path / 'orbax' / 'checkpoints' / '0' / 'config' / 'metadata'
  saved.write_text(saved.read_text().replace('"tie_embeddings": true', '"tie_embeddings": false'))
  one_sentence_and_nothing_written(
      lambda: convert.write_hf(*convert.read_orbax(str(tmp_path / 'orbax')), str(out)),
      'no output matrix', out)
