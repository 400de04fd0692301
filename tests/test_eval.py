"""eval.py: restore onto any mesh, perplexity, generation, multiple choice, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from llama_jax import convert, evaluation, generate, train_loop
from llama_jax import experiment as experiment_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sharding_lib
from llama_jax.data import mixture, pipeline
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = os.path.join(os.path.dirname(__file__), 'example_task.jsonl')


@pytest.fixture(scope='module')
def run(tmp_path_factory, corpus_dirs, small_config):
  """A small run trained on 8 devices with FSDP x tensor sharding."""
  text_dir, data_dir = corpus_dirs
  workdir = str(tmp_path_factory.mktemp('run'))
  config = small_config(
      text_dir, data_dir, **{
          'mesh.fsdp': 4,
          'mesh.tensor': 2,
          'train.steps': 12,
          'train.eval_every': 12
      })
  last = train_loop.train(config, workdir)
  tokenizer = tokenizer_lib.for_data(config.data, config.model.vocab_size)
  return dict(workdir=workdir, config=config, eval_loss=last['eval_loss'], tokenizer=tokenizer,
              overrides={
                  'data.data_dir': data_dir,
                  'data.text_dir': text_dir
              })


def restored(run, devices, mesh_sizes, bfloat16=False, **overrides):
  """(model, config, experiment, params) of the run's checkpoint on `devices`, as eval.py
  restores it."""
  directory = os.path.join(run['workdir'], 'checkpoints')
  config, step = evaluation.load_config(directory, None, {
      **run['overrides'],
      **overrides
  }, default.get_config())
  config.mesh.update(dict(zip(sharding_lib.MESH_AXES, mesh_sizes)))
  experiment = experiment_lib.build(config, devices)
  params = evaluation.restore_params(directory, step, experiment.model_config,
                                     experiment.params_shardings, bfloat16)
  return evaluation.model_of(params, config), config, experiment, params


def perplexity(run, **overrides):
  """eval.py's perplexity of the run's checkpoint on one device."""
  _, config, experiment, params = restored(run, jax.devices()[:1], (1, 1, 1, 1), **overrides)
  return evaluation.perplexity_by_source(config, experiment.eval_step, params,
                                         mixture.open_corpus(config.data), run['tokenizer'],
                                         range(config.train.batch_size), experiment.batch_sharding,
                                         jax.numpy.asarray(run['tokenizer'].token_bytes()))['']


def test_restores_onto_any_mesh(run):
  tokens = np.random.default_rng(0).integers(0, 400, (2, 16))
  one = restored(run, jax.devices()[:1], (1, 1, 1, 1))[0]
  two = restored(run, jax.devices()[:2], (1, 1, 1, 2))[0]
  eight = restored(run, jax.devices(), (2, 2, 1, 2))[0]
  want = np.asarray(one(tokens)[0])
  np.testing.assert_allclose(two(tokens)[0], want, atol=1e-5)
  np.testing.assert_allclose(eight(tokens)[0], want, atol=1e-5)
  wq = two.layers.attention.wq[...]
  assert wq.sharding.spec[2] == 'tensor' and len(wq.sharding.device_set) == 2
  half = restored(run, jax.devices()[:1], (1, 1, 1, 1), bfloat16=True)[0]
  assert half.output[...].dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(half(tokens)[0], want, atol=0.1)


def test_perplexity_equals_the_training_eval_loss(run):
  assert run['config'].train.loss_chunks == 1  # training evaluated whole sequences; here 4
  result = perplexity(run, **{'train.loss_chunks': 4})
  assert result['loss'] == pytest.approx(run['eval_loss'], rel=1e-5)
  assert result['perplexity'] == pytest.approx(np.exp(result['loss']))


def test_perplexity_follows_the_segment_mask_setting(run):
  """With data.segment_mask off, attention spans the packed documents: the loss equals
  full causal attention over each row, computed here by calling the model directly."""
  longer = {'train.seq_len': 64, 'train.eval_batches': 4}  # rows holding two documents
  masked = perplexity(run, **longer)
  unmasked = perplexity(run, **longer, **{'data.segment_mask': False})
  model, config, _, _ = restored(run, jax.devices()[:1], (1, 1, 1, 1), **longer)
  corpus = mixture.open_corpus(config.data)
  rows = range(config.train.batch_size)
  host = iter(
      pipeline.host_batches(config, corpus.eval, [1.0], run['tokenizer'], rows, shuffle=False))
  nll = weight = documents = 0.0
  for _ in range(config.train.eval_batches):
    batch = next(host)
    documents += sum(len(set(row)) for row in batch['segment_ids'])
    logits = np.asarray(model(batch['inputs'])[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    target_logp = np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    nll, weight = nll - (target_logp * batch['weights']).sum(), weight + batch['weights'].sum()
  assert documents > len(rows) * config.train.eval_batches  # some row spans a boundary
  assert unmasked['loss'] == pytest.approx(nll / weight, rel=1e-5)
  assert abs(unmasked['loss'] - masked['loss']) > 1e-4


def test_token_byte_lengths_add_up_to_the_text(run):
  tokenizer = run['tokenizer']
  lengths = tokenizer.token_bytes()
  for text in ('def f(x):\n    return x + 1', 'café 日本 1999'):
    ids = tokenizer_lib.encode_document(tokenizer, text)
    assert lengths[ids].sum() == len((' ' + text).encode())  # sentencepiece's dummy prefix


@nnx.jit
def _forward(model, tokens):
  return model(tokens)[0][0]


def full_logits(model, tokens):
  """[len(tokens), vocab]: one forward pass, padded on the right to the model's length (one
  compile; a causal model's logits at a position ignore what follows)."""
  padded = np.zeros((1, model.config.max_seq_len), np.int32)
  padded[0, :len(tokens)] = tokens
  return _forward(model, padded)[:len(tokens)]


@pytest.mark.slow
def test_multiple_choice_matches_a_naive_scorer(run):
  model = restored(run, jax.devices()[:1], (1, 1, 1, 1))[0]
  tokenizer = run['tokenizer']
  examples = evaluation.read_task(TASK)
  result = evaluation.multiple_choice(model, tokenizer, examples, batch_size=4)
  correct = correct_norm = 0
  for example in examples:
    scores = []
    for choice in example['choices']:
      context = [tokenizer.bos_id] + tokenizer.encode(example['context'])
      full = [tokenizer.bos_id] + tokenizer.encode(example['context'] + choice)
      assert full[:len(context)] == context
      logp = jax.nn.log_softmax(full_logits(model, full), axis=-1)
      scores.append(sum(float(logp[t - 1, full[t]]) for t in range(len(context), len(full))))
    correct += int(np.argmax(scores) == example['label'])
    correct_norm += int(
        np.argmax([s / len(c) for s, c in zip(scores, example['choices'])]) == example['label'])
  assert result['accuracy'] == correct / len(examples)
  assert result['accuracy_norm'] == correct_norm / len(examples)


def test_sampling_options():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  rng = jax.random.key(0)
  greedy = generate.Sampling()
  assert int(generate.sample(logits, rng, greedy)[0]) == 0
  draws = lambda sampling: {
      int(generate.sample(logits, k, sampling)[0]) for k in jax.random.split(rng, 200)
  }
  assert draws(generate.Sampling(temperature=1.0, top_k=2)) == {0, 1}
  assert draws(generate.Sampling(temperature=1.0, top_p=0.7)) == {0, 1}
  assert draws(generate.Sampling(temperature=1.0)) == {0, 1, 2, 3}


@nnx.jit
def _last_logits(model, tokens, length):
  """[batch, vocab] logits at position `length - 1` of one full forward pass, no cache.
  `tokens` is right-padded to a fixed length (one compile): a causal model's logits at a
  position do not depend on what follows it."""
  return model(tokens)[0][:, length - 1]


@pytest.mark.slow
def test_generation_matches_a_loop_without_cache_and_compiles_once():
  config = model_lib.ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=50, multiple_of=16,
                                 dtype='float32')
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  prompts = [[1, 4, 5, 30, 12], [1, 9]]
  sampling = generate.Sampling(max_new_tokens=6)
  eos = 7
  generate._generate.clear_cache()
  got = generate.generate(model, prompts, sampling, stop_ids=[eos])
  for prompt, row in zip(prompts, got):
    sequence, want = list(prompt), []
    for _ in range(6):  # naive greedy decoding: the full forward pass every time
      padded = np.zeros((1, 16), np.int32)  # room for the prompt and 6 new tokens
      padded[0, :len(sequence)] = sequence
      token = int(np.argmax(_last_logits(model, padded, len(sequence))[0]))
      if token == eos:
        break
      sequence.append(token)
      want.append(token)
    assert row == want
  generate.generate(model, [[1, 2, 3, 4, 5], [1, 3]], sampling, stop_ids=[eos])
  assert generate._generate._cache_size() == 1  # same shapes: compiled once
  # Several stop ids (Llama 3 ends on <|eot_id|> or <|end_of_text|>): each row ends at its first.
  longest = max(got, key=len)
  assert len(longest) >= 2
  second = longest[1]
  two = generate.generate(model, prompts, sampling, stop_ids={eos, second})
  assert two == [row[:row.index(second)] if second in row else row for row in got]

  model.norm.scale[...] = model.norm.scale[...] * 0  # every logit 0: argmax is token 0
  assert generate.generate(model, prompts, sampling, stop_ids=[0]) == [[], []]


def test_bad_workdirs_and_steps(run, tmp_path):
  defaults = default.get_config()
  with pytest.raises(UserError, match='no checkpoints in'):
    evaluation.load_config(str(tmp_path / 'checkpoints'), None, {}, defaults)
  with pytest.raises(UserError, match='no checkpoint of step 7 .* has steps 10, 12'):
    evaluation.load_config(os.path.join(run['workdir'], 'checkpoints'), 7, {}, defaults)
  config, step = evaluation.load_config(os.path.join(run['workdir'], 'checkpoints'), None,
                                        run['overrides'], defaults)
  tokenizer_lib.train(['some text for a tiny tokenizer'] * 50, 300, str(tmp_path / 'other.model'))
  config.data.tokenizer = str(tmp_path / 'other.model')
  config.model.vocab_size = 256
  with pytest.raises(UserError, match='has 300 tokens but model.vocab_size is 256'):
    tokenizer_lib.for_data(config.data, config.model.vocab_size)


@pytest.mark.slow
def test_eval_command_line(run, tmp_path):
  overrides = [f'--config.{k}={v}' for k, v in run['overrides'].items()]
  command = [
      sys.executable, 'eval.py', f'--workdir={run["workdir"]}', '--prompt=def f(', f'--task={TASK}',
      '--max_new_tokens=5', *overrides
  ]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(run['workdir'], 'eval_step12.json')) as f:
    results = json.load(f)
  assert results['task']['examples'] == 6 and len(results['generations']) == 1
  missing = subprocess.run([sys.executable, 'eval.py', f'--workdir={tmp_path}'], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert missing.returncode != 0 and 'error: no checkpoints in' in missing.stderr


def test_converted_weights_without_a_tokenizer_say_so_and_prepare_nothing(run, tmp_path):
  """eval.py never trains a tokenizer: for converted weights it asks for theirs."""
  convert.write_orbax(*convert.read_orbax(run['workdir']), str(tmp_path / 'converted'))
  data_dir = tmp_path / 'tfds'
  done = subprocess.run([
      sys.executable, 'eval.py', f'--workdir={tmp_path / "converted"}', '--prompt=def f(',
      f'--config.data.data_dir={data_dir}'
  ], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0
  assert 'error: no tokenizer: data.tokenizer is empty' in done.stderr, done.stderr[-2000:]
  assert '--config.data.tokenizer=PATH' in done.stderr
  assert not data_dir.exists() or not any(data_dir.iterdir())  # nothing prepared or trained
