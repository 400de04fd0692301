"""Chat templates against transformers' apply_chat_template; weights only on assistant turns."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llama_jax import convert
from llama_jax import model as model_lib
from llama_jax import steps
from llama_jax.data import chat
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = [
    '<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'
]
# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3), then byte-level BPE.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# A template as Hugging Face ships them: system prompt optional, raise_exception on bad order.
HF_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == "
    "'system' else 0)) and message['role'] != 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclasses.dataclass
class ContractTokenizer:
  """The tokenizer interface of llama_jax.data.tokenizer, over a `tokenizers` object."""
  backend: Tokenizer
  chat_template: str | None

  @property
  def special_tokens(self):
    return {s: self.backend.token_to_id(s) for s in SPECIALS}

  @property
  def bos_id(self):
    return self.backend.token_to_id('<|begin_of_text|>')

  @property
  def eos_id(self):
    return self.backend.token_to_id('<|end_of_text|>')

  def encode(self, text):
    assert not any(s in text for s in SPECIALS)  # render gives specials their ids itself
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self.backend.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope='module')
def tokenizers_pair():
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(pattern=__import__('tokenizers').Regex(SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  ])
  backend.decoder = decoders.ByteLevel()
  text = [
      'What does json.dumps do? Serialize obj to a JSON formatted str.', 'You are a helpful '
      'assistant.\n\nHello there! How are you today?', 'def f(x):\n    return x + 1\n\n'
  ] * 20
  backend.train_from_iterator(
      text,
      trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<|begin_of_text|>',
                                            eos_token='<|end_of_text|>',
                                            additional_special_tokens=SPECIALS[2:])
  return ContractTokenizer(backend, HF_TEMPLATE), hf


CONVERSATIONS = {
    'no_system': [{
        'role': 'user',
        'content': 'What does json.dumps do?'
    }, {
        'role': 'assistant',
        'content': 'Serialize obj to a JSON formatted str.'
    }],
    'system_multi_turn': [{
        'role': 'system',
        'content': 'You are a helpful assistant.'
    }, {
        'role': 'user',
        'content': 'Hello there!'
    }, {
        'role': 'assistant',
        'content': 'How are you today?'
    }, {
        'role': 'user',
        'content': 'def f(x):\n    return x + 1'
    }, {
        'role': 'assistant',
        'content': ' It adds one.\n\n'
    }],
}


def _hf_ids(hf, messages, template, **options):
  encoded = hf.apply_chat_template(messages, chat_template=template, tokenize=True, **options)
  return list(encoded['input_ids'] if hasattr(encoded, 'keys') else encoded)


@pytest.mark.parametrize('name', sorted(CONVERSATIONS))
@pytest.mark.parametrize('template_name', ['', 'llama3'])
def test_text_and_ids_equal_transformers(tokenizers_pair, name, template_name):
  ours, hf = tokenizers_pair
  messages = CONVERSATIONS[name]
  template = chat.template_of(ours, template_name)
  want_text = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
  assert chat.render_text(ours, messages, template_name=template_name) == want_text
  ids, weights = chat.render(ours, messages, template_name=template_name)
  assert ids == _hf_ids(hf, messages, template)
  prompt = messages[:-1]
  generation_ids, generation_weights = chat.render(ours, prompt, template_name=template_name,
                                                   add_generation_prompt=True)
  assert generation_ids == _hf_ids(hf, prompt, template, add_generation_prompt=True)
  assert set(generation_weights) == {0}

  # weights: exactly the assistant contents (trimmed, as the template writes them) + <|eot_id|>
  eot = ours.special_tokens['<|eot_id|>']
  spans, current = [], []
  for token, weight in zip(ids, weights):
    if weight:
      current.append(token)
    elif current:
      spans, current = spans + [current], []
  spans += [current] if current else []
  answers = [m['content'].strip() for m in messages if m['role'] == 'assistant']
  assert [ours.decode(span) for span in spans] == [a + '<|eot_id|>' for a in answers]
  assert all(span[-1] == eot for span in spans)


def test_llama2_builtin_marks_the_answers(tokenizers_pair):
  ours, _ = tokenizers_pair
  messages = CONVERSATIONS['system_multi_turn']
  text = chat.render_text(ours, messages, template_name='llama2')
  assert text == ('<|begin_of_text|>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n'
                  'Hello there! [/INST] How are you today? <|end_of_text|><|begin_of_text|>[INST] '
                  'def f(x):\n    return x + 1 [/INST] It adds one. <|end_of_text|>')
  ids, weights = chat.render(ours, messages, template_name='llama2')
  answer = ours.decode([t for t, w in zip(ids, weights) if w])
  assert answer == ' How are you today? <|end_of_text|> It adds one. <|end_of_text|>'


def test_bad_conversations_are_one_sentence(tokenizers_pair):
  ours, _ = tokenizers_pair
  with pytest.raises(UserError, match='has no assistant turn'):
    chat.render(ours, [{'role': 'user', 'content': 'hi'}])
  with pytest.raises(UserError, match="unknown role 'bot'"):
    chat.render(ours, [{'role': 'bot', 'content': 'hi'}])
  with pytest.raises(UserError, match='failed to render .*must alternate'):
    chat.render(ours, [{'role': 'assistant', 'content': 'hi'}, {'role': 'user', 'content': 'x'}])
  with pytest.raises(UserError, match='is not valid Jinja'):
    chat.render(dataclasses.replace(ours, chat_template='{% for %}'), CONVERSATIONS['no_system'])
  with pytest.raises(UserError, match='has no chat template'):
    chat.render(dataclasses.replace(ours, chat_template=None), CONVERSATIONS['no_system'])
  with pytest.raises(UserError, match="data.chat_template is 'llama4'"):
    chat.render(ours, CONVERSATIONS['no_system'], template_name='llama4')


def _packed_batch(conversations, length):
  """One row holding the rendered conversations back to back (segment ids 1, 2, ...), as the
  pipeline packs documents: a target weighs its render weight inside its own conversation."""
  tokens, loss_weights, segments, positions = [], [], [], []
  for segment, (ids, weights) in enumerate(conversations, 1):
    tokens += ids
    loss_weights += weights
    segments += [segment] * len(ids)
    positions += list(range(len(ids)))
  pad = length + 1 - len(tokens)
  assert pad >= 0
  tokens, loss_weights = tokens + [0] * pad, loss_weights + [0] * pad
  segments, positions = segments + [0] * pad, positions + [0] * pad
  tokens, segments = np.array([tokens]), np.array([segments])
  return {
      'inputs': jnp.asarray(tokens[:, :-1]),
      'targets': jnp.asarray(tokens[:, 1:]),
      'segment_ids': jnp.asarray(segments[:, :-1]),
      'positions': jnp.asarray(np.array([positions])[:, :-1]),
      'weights': jnp.asarray(
          (segments[:, 1:] == segments[:, :-1]) * np.array([loss_weights])[:, 1:], jnp.float32),
  }


def test_packed_sft_loss_is_the_assistant_tokens_mean_and_ignores_user_targets(tokenizers_pair):
  ours, _ = tokenizers_pair
  conversations = [chat.render(ours, m) for m in CONVERSATIONS.values()]
  conversations.append(chat.render(ours, CONVERSATIONS['no_system'], template_name='llama2'))
  config = model_lib.ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=400, multiple_of=16,
                                 max_seq_len=256, dtype='float32', attention='reference')
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = _packed_batch(conversations, 160)
  loss, weight, _ = steps.token_losses(params, graphdef, batch, 0.0, True, 1)

  # naive: each conversation alone, float64 log-softmax, the assistant targets only
  total, count = 0.0, 0
  for ids, weights in conversations:
    logits = np.asarray(model(jnp.asarray([ids[:-1]]))[0][0], np.float64)
    log_probs = logits - np.log(
        np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
    for t, (target, w) in enumerate(zip(ids[1:], weights[1:])):
      total -= w * log_probs[t, target]
      count += w
  assert count == float(weight) > 0
  np.testing.assert_allclose(float(loss) / float(weight), total / count, rtol=1e-5)

  # a user-turn target (weight 0) changes no gradient
  grad = jax.jit(jax.grad(lambda p, b: steps.token_losses(p, graphdef, b, 0.0, True, 1)[0]))
  user = int(
      np.flatnonzero((np.asarray(batch['weights'][0]) == 0) &
                     (np.asarray(batch['segment_ids'][0]) == 1))[3])
  changed = dict(batch, targets=batch['targets'].at[0, user].set(
      (batch['targets'][0, user] + 7) % 400))
  for a, b in zip(jax.tree.leaves(grad(params, batch)), jax.tree.leaves(grad(params, changed))):
    np.testing.assert_array_equal(a, b)
  assistant = int(np.flatnonzero(np.asarray(batch['weights'][0]))[0])
  changed = dict(
      batch, targets=batch['targets'].at[0, assistant].set(
          (batch['targets'][0, assistant] + 7) % 400))
  assert not np.array_equal(
      jax.tree.leaves(grad(params, batch))[0],
      jax.tree.leaves(grad(params, changed))[0])


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)[0][0]  # [length, vocab]


def _greedy(model, prompt, stop_ids, max_new_tokens):
  """Naive greedy decoding: for every token the full forward pass over the sequence so far
  (right-padded to one length: causal, so the padding changes no logit read), until a stop
  id."""
  graphdef, params = nnx.split(model)
  sequence, new = list(prompt), []
  for _ in range(max_new_tokens):
    logits = _logits(graphdef, params, np.array([sequence + [0] * (64 - len(sequence))]))
    token = int(np.argmax(logits[len(sequence) - 1]))
    if token in stop_ids:
      return new, token
    sequence.append(token)
    new.append(token)
  return new, None


def test_eval_chat_answers_the_transformers_prompt_greedily_and_stops_on_eot(
    tokenizers_pair, tmp_path):
  """`eval.py --chat` on a converted model with a chat template: each answer is the greedy
  continuation of the ids transformers' apply_chat_template gives (with the generation
  prompt), cut at the tokenizer's stop ids (<|eot_id|> here, not only EOS)."""
  _, hf = tokenizers_pair
  hf.chat_template = HF_TEMPLATE  # saved into the folder, then off the shared fixture again
  hf.save_pretrained(str(tmp_path / 'tokenizer'))
  hf.chat_template = None
  stops = tokenizer_lib.load(str(tmp_path / 'tokenizer')).stop_ids
  eot = hf.convert_tokens_to_ids('<|eot_id|>')
  assert stops == {eot, hf.eos_token_id}

  questions = ['What does json.dumps do?', 'Hello there!']
  prompts = [
      _hf_ids(hf, [{
          'role': 'user',
          'content': q
      }], HF_TEMPLATE, add_generation_prompt=True) for q in questions
  ]
  config = model_lib.ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=400, multiple_of=16,
                                 max_seq_len=128, dtype='float32', attention='reference')
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  # Make the first question's answer end on <|eot_id|>: swap its output column with that of
  # the first token of the greedy answer that is new and comes third or later.
  free_run, _ = _greedy(model, prompts[0], set(), 12)
  k = next(k for k in range(2, 12) if free_run[k] not in free_run[:k] + [eot])
  assert eot not in free_run[:k]
  output = model.output[...]
  model.output[...] = output.at[:, [eot, free_run[k]]].set(output[:, [free_run[k], eot]])
  want = [_greedy(model, prompt, stops, 12) for prompt in prompts]
  assert want[0] == (free_run[:k], eot)

  convert.write_orbax(config, nnx.state(model, nnx.Param), str(tmp_path / 'model'),
                      tokenizer_from=str(tmp_path / 'tokenizer'))
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # one CPU device
  done = subprocess.run([
      sys.executable, 'eval.py', f'--workdir={tmp_path / "model"}', '--max_new_tokens=12',
      *[f'--chat={q}' for q in questions]
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / 'model' / 'eval_step0.json') as f:
    answers = json.load(f)['chat']
  assert answers == [{
      'question': q,
      'answer': hf.decode(ids, skip_special_tokens=False)
  } for q, (ids, _) in zip(questions, want)]
