"""eval.py: restore onto any mesh, perplexity, generation, multiple choice, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import evaluate, generate, trainer
from llama_jax import model as model_lib
from llama_jax import sharding as sharding_lib
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError
from test_train import REPO, small_config
from test_data import write_corpus

TASK = os.path.join(os.path.dirname(__file__), 'example_task.jsonl')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A small run trained on 8 devices with FSDP x tensor sharding."""
  text_dir = str(tmp_path_factory.mktemp('corpus'))
  write_corpus(text_dir, n_files=80)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('run'))
  config = small_config(text_dir, data_dir, **{'mesh.fsdp': 4, 'mesh.tensor': 2,
                                               'train.steps': 12, 'train.eval_every': 12})
  last = trainer.train(config, workdir)
  _, _, tokenizer = trainer.prepare_data(config.data, config.model.vocab_size)
  return dict(workdir=workdir, config=config, eval_loss=last['eval_loss'], tokenizer=tokenizer,
              overrides={'data.data_dir': data_dir, 'data.text_dir': text_dir})


def restored(run, devices, mesh_sizes, bfloat16=False):
  directory = os.path.join(run['workdir'], 'checkpoints')
  config, step = evaluate.load_config(directory, None, run['overrides'])
  config.mesh.update(dict(zip(sharding_lib.MESH_AXES, mesh_sizes)))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  return evaluate.restore_model(directory, step, config, mesh, bfloat16), config


def test_restores_onto_any_mesh(run):
  tokens = np.random.default_rng(0).integers(0, 400, (2, 16))
  one, _ = restored(run, jax.devices()[:1], (1, 1, 1, 1))
  two, _ = restored(run, jax.devices()[:2], (1, 1, 1, 2))
  eight, _ = restored(run, jax.devices(), (2, 2, 1, 2))
  want = np.asarray(one(tokens)[0])
  np.testing.assert_allclose(two(tokens)[0], want, atol=1e-5)
  np.testing.assert_allclose(eight(tokens)[0], want, atol=1e-5)
  wq = two.layers.attention.wq[...]
  assert wq.sharding.spec[2] == 'tensor' and len(wq.sharding.device_set) == 2
  half, _ = restored(run, jax.devices()[:1], (1, 1, 1, 1), bfloat16=True)
  assert half.output[...].dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(half(tokens)[0], want, atol=0.1)


def test_perplexity_equals_the_training_eval_loss(run):
  model, config = restored(run, jax.devices()[:1], (1, 1, 1, 1))
  tokenizer = run['tokenizer']
  _, eval_source, _ = trainer.prepare_data(config.data, config.model.vocab_size)
  rows = range(config.train.batch_size)
  batches = iter(trainer.host_batches(config, eval_source, tokenizer, rows, shuffle=False))
  assert config.train.loss_chunks == 1  # training evaluated whole sequences; here 4 chunks
  result = evaluate.perplexity(model, batches, config.train.eval_batches, tokenizer,
                               loss_chunks=4)
  assert result['loss'] == pytest.approx(run['eval_loss'], rel=1e-5)
  assert result['perplexity'] == pytest.approx(np.exp(result['loss']))


def test_token_byte_lengths_add_up_to_the_text(run):
  tokenizer = run['tokenizer']
  lengths = evaluate.byte_lengths(tokenizer)
  for text in ('def f(x):\n    return x + 1', 'café 日本 1999'):
    ids = tokenizer_lib.encode_document(tokenizer, text)
    assert lengths[ids].sum() == len((' ' + text).encode())  # sentencepiece's dummy prefix


def test_multiple_choice_matches_a_naive_scorer(run):
  model, _ = restored(run, jax.devices()[:1], (1, 1, 1, 1))
  tokenizer = run['tokenizer']
  examples = evaluate.read_task(TASK)
  result = evaluate.multiple_choice(model, tokenizer, examples, batch_size=4)
  correct = correct_norm = 0
  for example in examples:
    scores = []
    for choice in example['choices']:
      context = [tokenizer.bos_id()] + tokenizer.encode(example['context'])
      full = [tokenizer.bos_id()] + tokenizer.encode(example['context'] + choice)
      assert full[:len(context)] == context
      logits, _ = model(np.array([full]))
      logp = jax.nn.log_softmax(logits[0], axis=-1)
      scores.append(sum(float(logp[t - 1, full[t]]) for t in range(len(context), len(full))))
    correct += int(np.argmax(scores) == example['label'])
    correct_norm += int(np.argmax([s / len(c) for s, c in zip(scores, example['choices'])])
                        == example['label'])
  assert result['accuracy'] == correct / len(examples)
  assert result['accuracy_norm'] == correct_norm / len(examples)


def test_sampling_options():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  rng = jax.random.key(0)
  greedy = generate.Sampling()
  assert int(generate.sample(logits, rng, greedy)[0]) == 0
  draws = lambda sampling: {int(generate.sample(logits, k, sampling)[0])
                            for k in jax.random.split(rng, 200)}
  assert draws(generate.Sampling(temperature=1.0, top_k=2)) == {0, 1}
  assert draws(generate.Sampling(temperature=1.0, top_p=0.7)) == {0, 1}
  assert draws(generate.Sampling(temperature=1.0)) == {0, 1, 2, 3}


def test_generation_matches_a_loop_without_cache_and_compiles_once():
  config = model_lib.ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=50, multiple_of=16,
                                 dtype='float32')
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  prompts = [[1, 4, 5, 30, 12], [1, 9]]
  sampling = generate.Sampling(max_new_tokens=6)
  eos = 7
  generate._generate.clear_cache()
  got = generate.generate(model, prompts, sampling, eos_id=eos)
  for prompt, row in zip(prompts, got):
    sequence, want = list(prompt), []
    for _ in range(6):  # naive greedy decoding: the full forward pass every time
      token = int(np.argmax(model(np.array([sequence]))[0][0, -1]))
      if token == eos:
        break
      sequence.append(token)
      want.append(token)
    assert row == want
  generate.generate(model, [[1, 2, 3, 4, 5], [1, 3]], sampling, eos_id=eos)
  assert generate._generate._cache_size() == 1  # same shapes: compiled once

  model.norm.scale[...] = model.norm.scale[...] * 0  # every logit 0: argmax is token 0
  assert generate.generate(model, prompts, sampling, eos_id=0) == [[], []]


def test_bad_workdirs_and_steps(run, tmp_path):
  with pytest.raises(UserError, match='no checkpoints in'):
    evaluate.load_config(str(tmp_path / 'checkpoints'), None, {})
  with pytest.raises(UserError, match='no checkpoint of step 7 .* has steps 10, 12'):
    evaluate.load_config(os.path.join(run['workdir'], 'checkpoints'), 7, {})
  config, step = evaluate.load_config(os.path.join(run['workdir'], 'checkpoints'), None,
                                      run['overrides'])
  tokenizer_lib.train(['some text for a tiny tokenizer'] * 50, 300, str(tmp_path / 'other.model'))
  config.data.tokenizer = str(tmp_path / 'other.model')
  with pytest.raises(UserError, match='has 300 tokens but model.vocab_size is 400'):
    trainer.prepare_data(config.data, config.model.vocab_size)


def test_eval_command_line(run, tmp_path):
  overrides = [f'--config.{k}={v}' for k, v in run['overrides'].items()]
  command = [sys.executable, 'eval.py', f'--workdir={run["workdir"]}', '--prompt=def f(',
             f'--task={TASK}', '--max_new_tokens=5', *overrides]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(run['workdir'], 'eval_step12.json')) as f:
    results = json.load(f)
  assert results['task']['examples'] == 6 and len(results['generations']) == 1
  missing = subprocess.run([sys.executable, 'eval.py', f'--workdir={tmp_path}'], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert missing.returncode != 0 and 'error: no checkpoints in' in missing.stderr
