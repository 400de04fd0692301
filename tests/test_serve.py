"""serve.py: a real server process on 127.0.0.1, driven with the official `openai` client."""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import portpicker
import pytest

from llama_jax import train_loop

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
def workdir(tmp_path_factory, corpus_dirs, small_config):
  """A small run (256-token context, room to generate) and its data overrides."""
  text_dir, data_dir = corpus_dirs
  workdir = str(tmp_path_factory.mktemp('run'))
  config = small_config(text_dir, data_dir, **{
      'model.max_seq_len': 256,
      'train.steps': 12,
      'train.eval_every': 0
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
