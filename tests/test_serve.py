"""serve.py: a real server process on 127.0.0.1, driven with the official `openai` client."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import portpicker
import pytest
import transformers
from test_chat import HF_TEMPLATE as CHAT_TEMPLATE
from test_chat import SPECIALS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llama_jax import train_loop
from llama_jax.serving import engine as engine_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['def return', 'alpha beta gamma', 'import', 'class kappa lambda mu 42']
# One device: the server's own mesh (the checkpoint was written by 8).
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


class Server:
  """`python serve.py` on a free loopback port; `url`, `client()`, `stop()`."""
  def __init__(self, workdir, log_path, *flags):
    self.port = portpicker.pick_unused_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log = open(log_path, 'w+')
    self.process = subprocess.Popen(
        [sys.executable, 'serve.py', f'--workdir={workdir}', f'--port={self.port}', *flags],
        cwd=REPO, env=ENV, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
      assert self.process.poll() is None, self.output()
      try:
        if httpx.get(f'{self.url}/health', timeout=1).status_code == 200:
          return
      except httpx.TransportError:
        time.sleep(0.5)
    raise AssertionError(f'the server did not start within 180 s:\n{self.output()}')

  def output(self) -> str:
    self.log.seek(0)
    return self.log.read()[-5000:]

  def client(self, api_key='unused', **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f'{self.url}/v1', api_key=api_key, max_retries=0, timeout=60,
                         **options)

  def metric(self, name) -> float:
    text = httpx.get(f'{self.url}/metrics', timeout=10).text
    return float(re.search(rf'^{name} (\S+)$', text, re.M).group(1))

  def stop(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait(timeout=30)
    self.log.close()


@pytest.fixture(scope='module')
def hf_tokenizer(tmp_path_factory, corpus_dirs):
  """(folder, transformers tokenizer): a byte-level BPE tokenizer.json with Llama 3's special
  tokens and a chat template, trained on the test corpus and saved by transformers."""
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  texts = []
  for root, _, files in os.walk(corpus_dirs[0]):
    texts += [open(os.path.join(root, name), encoding='utf-8').read() for name in files]
  backend.train_from_iterator(
      texts,
      trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0],
                                            eos_token=SPECIALS[1],
                                            additional_special_tokens=SPECIALS[2:])
  hf.chat_template = CHAT_TEMPLATE
  folder = str(tmp_path_factory.mktemp('tokenizer'))
  hf.save_pretrained(folder)
  return folder, hf


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, corpus_dirs, small_config, hf_tokenizer):
  """A small run (256-token context, room to generate) with the chat tokenizer."""
  text_dir, data_dir = corpus_dirs
  workdir = str(tmp_path_factory.mktemp('run'))
  config = small_config(
      text_dir, data_dir, **{
          'model.max_seq_len': 256,
          'train.steps': 12,
          'train.eval_every': 0,
          'data.tokenizer': hf_tokenizer[0]
      })
  train_loop.train(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def server(workdir, tmp_path_factory):
  running = Server(workdir,
                   tmp_path_factory.mktemp('logs') / 'serve.txt', '--slots=4', '--max_queue=40')
  yield running
  running.stop()


def eval_py_generations(workdir, prompts, max_new_tokens):
  """eval.py's greedy completions of `prompts`."""
  subprocess.run([
      sys.executable, 'eval.py', f'--workdir={workdir}', '--temperature=0',
      f'--max_new_tokens={max_new_tokens}'
  ] + [f'--prompt={p}' for p in prompts], cwd=REPO, env=ENV, check=True, capture_output=True,
                 timeout=300)
  [path] = [f for f in os.listdir(workdir) if f.startswith('eval_step')]
  with open(os.path.join(workdir, path)) as f:
    return [row['completion'] for row in json.load(f)['generations']]


def test_greedy_completions_equal_eval_py_and_streaming_adds_up(server, workdir):
  client = server.client()
  want = eval_py_generations(workdir, PROMPTS, 40)
  for prompt, expected in zip(PROMPTS, want):
    got = client.completions.create(model=os.path.basename(workdir), prompt=prompt, max_tokens=40,
                                    temperature=0)
    assert got.choices[0].text == expected
    assert got.usage.prompt_tokens > 1 and got.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(model=os.path.basename(workdir), prompt=prompt, max_tokens=40,
                                  temperature=0, stream=True))
    assert ''.join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ('stop', 'length')


def _settings(i):
  """The i-th of 32 requests: prompts, lengths and sampling settings all differ."""
  return dict(prompt=PROMPTS[i % 4] + ' zeta' * (i % 7), max_tokens=4 + 5 * (i % 9),
              temperature=(0.0, 0.8, 1.3)[i % 3], top_p=(1.0, 0.9)[i % 2], seed=1000 + i)


def test_concurrent_requests_complete_and_seeded_ones_equal_served_alone(server, workdir):
  client, model = server.client(), os.path.basename(workdir)
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    together = list(
        pool.map(lambda i: client.completions.create(model=model, **_settings(i)), range(32)))
  for i, response in enumerate(together):
    assert response.choices[0].finish_reason in ('stop', 'length')
    assert 0 <= response.usage.completion_tokens <= _settings(i)['max_tokens']  # EOS may be first
  alone = [client.completions.create(model=model, **_settings(i)) for i in range(32)]
  assert [r.choices[0].text for r in alone] == [r.choices[0].text for r in together]
  assert len({r.choices[0].text for r in together}) > 16  # the settings did change the text
  assert server.metric('llama_slots_busy') == 0 and server.metric('llama_queue_length') == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, workdir):
  client, model = server.client(), os.path.basename(workdir)
  request = dict(model=model, prompt='def return', max_tokens=200, temperature=0)
  assert client.completions.create(**request).usage.completion_tokens == 200  # no early stop
  before = server.metric('llama_generated_tokens_total')
  stream = client.completions.create(**request, stream=True)
  for _, _ in zip(range(3), stream):
    pass
  stream.close()
  deadline = time.time() + 30
  while server.metric('llama_slots_busy') and time.time() < deadline:
    time.sleep(0.05)
  assert server.metric('llama_slots_busy') == 0
  assert server.metric('llama_generated_tokens_total') - before < 200  # stopped early
  assert client.completions.create(**request).usage.completion_tokens == 200


def test_logprobs_and_usage(server, workdir):
  response = server.client().completions.create(model=os.path.basename(workdir), prompt='import',
                                                max_tokens=8, temperature=0, logprobs=3)
  logprobs = response.choices[0].logprobs
  assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
  assert ''.join(logprobs.tokens).strip() == response.choices[0].text.strip()
  for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
    assert len(top) <= 3 and chosen <= 0
    assert chosen == pytest.approx(max(top.values()))  # greedy takes the most likely token
  assert response.usage.total_tokens == (response.usage.prompt_tokens +
                                         response.usage.completion_tokens)


def test_stop_strings_cut_the_text(server, workdir):
  client = server.client()
  request = dict(model=os.path.basename(workdir), prompt='alpha', max_tokens=30, temperature=1,
                 seed=7)
  full = client.completions.create(**request).choices[0].text
  assert len(full) >= 6
  stop = full[len(full) // 2:len(full) // 2 + 2]
  cut = client.completions.create(**request, stop=['never', stop])
  assert cut.choices[0].text == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == 'stop'
  streamed = client.completions.create(**request, stop=stop, stream=True)
  assert ''.join(c.choices[0].text for c in streamed) == cut.choices[0].text


def _post(server, body, client=httpx, timeout_s=30, path='completions', **headers):
  content = body if isinstance(body, (bytes, str)) else json.dumps(body)
  return client.post(f'{server.url}/v1/{path}', content=content, timeout=timeout_s, headers={
      'content-type': 'application/json',
      **headers
  })


CONVERSATIONS = [
    [{
        'role': 'user',
        'content': 'alpha beta gamma'
    }],
    [{
        'role': 'system',
        'content': 'def return'
    }, {
        'role': 'user',
        'content': 'class kappa'
    }, {
        'role': 'assistant',
        'content': 'import 42 '
    }, {
        'role': 'user',
        'content': ' lambda mu'
    }],
]


def test_chat_renders_the_template_as_transformers_does(server, workdir, hf_tokenizer):
  client, model, hf = server.client(), os.path.basename(workdir), hf_tokenizer[1]
  for messages in CONVERSATIONS:
    encoded = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(encoded['input_ids'] if hasattr(encoded, 'keys') else encoded)
    want = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                           temperature=0)
    assert reply.object == 'chat.completion' and reply.choices[0].message.role == 'assistant'
    assert reply.choices[0].message.content == want.choices[0].text
    assert reply.choices[0].finish_reason == want.choices[0].finish_reason
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == want.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                       stream=True, stream_options={'include_usage': True}))
    assert {c.object for c in chunks} == {'chat.completion.chunk'}
    assert chunks[0].choices[0].delta.role == 'assistant'
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_bad_chat_requests_get_openai_errors(server, workdir):
  model = os.path.basename(workdir)
  good = dict(model=model, messages=CONVERSATIONS[0], max_tokens=4)
  bad = [
      ({
          'model': model
      }, 'messages'),
      ({
          **good, 'messages': 'hi'
      }, 'messages'),
      ({
          **good, 'messages': []
      }, 'messages'),
      ({
          **good, 'messages': ['hi']
      }, 'messages'),
      ({
          **good, 'messages': [{
              'role': 'bot',
              'content': 'hi'
          }]
      }, 'messages'),
      ({
          **good, 'messages': [{
              'role': 'user'
          }]
      }, 'messages'),
      ({
          **good, 'messages': [{
              'role': 'user',
              'content': 5
          }]
      }, 'messages'),
      ({
          **good, 'messages': [{
              'role': 'assistant',
              'content': 'a'
          }, {
              'role': 'user',
              'content': 'b'
          }]
      }, 'messages'),  # the template's own raise_exception
      ({
          **good, 'max_tokens': 0
      }, 'max_tokens'),
      ({
          **good, 'model': 'gpt-4'
      }, 'model'),
      ({
          **good, 'logprobs': True
      }, 'logprobs'),
  ]
  for body, param in bad:
    response = _post(server, body, path='chat/completions')
    assert response.status_code == 400, body
    error = response.json()['error']
    assert error['type'] == 'invalid_request_error' and error['message'].endswith('.'), error
    assert error['param'] == param, body
  with pytest.raises(openai.BadRequestError, match="unknown role 'bot'"):
    server.client().chat.completions.create(model=model, messages=[{
        'role': 'bot',
        'content': 'hi'
    }])
  assert _post(server, good, path='chat/completions').json()['usage']['completion_tokens'] > 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, workdir):
  model = os.path.basename(workdir)
  good = dict(model=model, prompt='alpha', max_tokens=4)
  bad = [
      (b'{"model": ', None),
      ([1, 2], None),
      ({
          'prompt': 'alpha'
      }, 'model'),
      ({
          'model': model
      }, 'prompt'),
      ({
          **good, 'model': 'gpt-4'
      }, 'model'),
      ({
          **good, 'max_tokens': 'ten'
      }, 'max_tokens'),
      ({
          **good, 'max_tokens': 0
      }, 'max_tokens'),
      ({
          **good, 'max_tokens': 255
      }, 'max_tokens'),  # with the prompt, past the 256 tokens
      ({
          **good, 'temperature': 'hot'
      }, 'temperature'),
      ({
          **good, 'top_p': 0
      }, 'top_p'),
      ({
          **good, 'stream': 'yes'
      }, 'stream'),
      ({
          **good, 'stop': 5
      }, 'stop'),
      ({
          **good, 'n': 2
      }, 'n'),
      ({
          **good, 'logprobs': 9
      }, 'logprobs'),
      ({
          **good, 'prompt': [1, 10**6]
      }, 'prompt'),
  ]
  for body, param in bad:
    response = _post(server, body)
    assert response.status_code == 400, body
    error = response.json()['error']
    assert error['type'] == 'invalid_request_error' and error['message'].endswith('.')
    assert error['param'] == param, body
  with pytest.raises(openai.BadRequestError, match='not served here'):
    server.client().completions.create(model='gpt-4', prompt='alpha')
  with httpx.Client() as connection:
    for i in range(200):
      assert _post(server, bad[i % len(bad)][0], connection).status_code == 400
  assert _post(server, good).json()['usage']['completion_tokens'] > 0
  for response in (httpx.get(f'{server.url}/v1/completions',
                             timeout=10), httpx.post(f'{server.url}/v1/embeddings', timeout=10)):
    assert response.status_code in (404, 405) and response.json()['error']['message']
  models = httpx.get(f'{server.url}/v1/models', timeout=10).json()
  assert [m['id'] for m in models['data']] == [model]


def test_api_key_queue_limit_and_sigterm(workdir, tmp_path):
  server = Server(workdir, tmp_path / 'serve.txt', '--api_key=secret', '--slots=2', '--max_queue=2')
  try:
    model = os.path.basename(workdir)
    with pytest.raises(openai.AuthenticationError):
      server.client(api_key='wrong').completions.create(model=model, prompt='alpha')
    assert _post(server, dict(model=model, prompt='alpha')).status_code == 401
    key = {'authorization': 'Bearer secret'}
    request = dict(model=model, prompt='def return', max_tokens=200, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      answers = list(pool.map(lambda _: _post(server, request, **key), range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    busy = [a for a in answers if a.status_code == 429]
    assert busy[0].headers['retry-after'] == '1'
    assert busy[0].json()['error']['code'] == 'rate_limit_exceeded'

    client, results = server.client(api_key='secret'), []
    first_chunks = threading.Barrier(3, timeout=60)

    def stream():
      chunks = iter(client.completions.create(**request, stream=True))
      text = next(chunks).choices[0].text
      first_chunks.wait()
      rest = list(chunks)
      results.append(
          (text + ''.join(c.choices[0].text for c in rest), rest[-1].choices[0].finish_reason))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
      thread.start()
    first_chunks.wait()  # both slots are streaming
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
      thread.join(timeout=60)
    assert server.process.wait(timeout=60) == 0, server.output()
    assert len(results) == 2 and all(reason == 'length' for _, reason in results), results
    assert len({text for text, _ in results}) == 1
  finally:
    server.stop()


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(server, workdir):
  body = json.dumps(
      dict(model=os.path.basename(workdir), prompt='def return', max_tokens=240,
           temperature=0)).encode()
  before = server.metric('llama_generated_tokens_total')
  with socket.create_connection(('127.0.0.1', server.port), timeout=30) as connection:
    connection.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                       b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n' % len(body) +
                       body)
    deadline = time.time() + 30
    while not server.metric('llama_slots_busy') and time.time() < deadline:
      time.sleep(0.01)
  deadline = time.time() + 30  # closed while generating: the slot must come back early
  while server.metric('llama_slots_busy') and time.time() < deadline:
    time.sleep(0.05)
  assert server.metric('llama_slots_busy') == 0
  assert server.metric('llama_generated_tokens_total') - before < 240


def test_a_lora_run_on_a_tied_embedding_base_serves_eval_py_greedy_text(
    corpus_dirs, small_config, hf_tokenizer, tmp_path):
  """Base + adapters restored as eval.py restores them, and the output projection being the
  embedding table (Llama 3.2): one short run covers both."""
  text_dir, data_dir = corpus_dirs
  tied = {'model.tie_embeddings': True, 'train.eval_every': 0, 'data.tokenizer': hf_tokenizer[0]}
  base, adapted = str(tmp_path / 'base'), str(tmp_path / 'lora')
  train_loop.train(small_config(text_dir, data_dir, **tied, **{'train.steps': 4}), base)
  config = small_config(text_dir, data_dir, **tied, **{'train.steps': 4})
  config.model.lora.update(dict(rank=4, alpha=8.0, targets=('wq', 'wv', 'w2')))
  config.optim.learning_rate = 1e-2
  config.checkpoint.init_params = base
  train_loop.train(config, adapted)
  want = eval_py_generations(adapted, PROMPTS, 24)
  server = Server(adapted, tmp_path / 'serve.txt', '--slots=2')
  try:
    client = server.client()
    for prompt, expected in zip(PROMPTS, want):
      got = client.completions.create(model='lora', prompt=prompt, max_tokens=24, temperature=0)
      assert got.choices[0].text == expected
  finally:
    server.stop()


@pytest.mark.parametrize('temperature, top_p', [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_follows_the_tempered_nucleus_distribution(temperature, top_p):
  """20,000 rows with their own seeds: token frequencies against the formula (softmax of
  logits / temperature over the smallest set of tokens whose probability reaches top_p)."""
  rows = 20_000
  logits = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01], np.float32))
  tokens = engine_lib.sample_rows(np.tile(logits, (rows, 1)), np.arange(rows, dtype=np.int32),
                                  np.full(rows, 3, np.int32), np.full(rows, temperature,
                                                                      np.float32),
                                  np.full(rows, top_p, np.float32))
  probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
  keep = np.cumsum(probs) - probs < top_p  # sorted already: those before reach top_p only after
  want = np.where(keep, probs, 0) / probs[keep].sum()
  got = np.bincount(np.asarray(tokens), minlength=len(logits)) / rows
  np.testing.assert_allclose(got, want, atol=0.012)
  assert got[~keep].sum() == 0
