"""Parity with Hugging Face transformers (PyTorch) and Meta's checkpoint layout."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

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
