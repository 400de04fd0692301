"""Serving throughput and latency under concurrent clients (continuous batching).

  python -m benchmarks.serving [--workdir=runs/tiny] [--concurrency=1,4,16,64] [--slots=16]

Starts serve.py on the checkpoint (127.0.0.1, a free port), then for each concurrency level N
runs N clients that each stream --requests_per_client completions (sampled, seeded,
--max_tokens each) one after another, and prints generated tokens/s, time to first token
and inter-token latency (p50, p99) per level, and tokens/s against the one-at-a-time rate:
the level 1 run, and (with --baseline_slots) the requests of the largest level served one at
a time by a server with that many slots, each level's rate divided by it: the comparison
that says what batching gains.
"""

import concurrent.futures
import logging
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import portpicker
from absl import app, flags

flags.DEFINE_string('workdir', 'runs/tiny', 'The checkpoint to serve (train.py quick start).')
flags.DEFINE_list('concurrency', ['1', '4', '16', '64'], 'Concurrent clients per level.')
flags.DEFINE_integer('slots', 16, "The server's decode slots.")
flags.DEFINE_integer(
    'baseline_slots', 1, 'Slots of a second server that serves the requests of '
    'the --compare level one at a time (0: none).')
flags.DEFINE_list('serve_flags', [],
                  'More serve.py flags for both servers, e.g. --config.model.dtype=float32.')
flags.DEFINE_integer('compare', 16, 'The level whose requests the one-at-a-time server serves.')
flags.DEFINE_integer('requests_per_client', 2, 'Requests each client sends, one after another.')
flags.DEFINE_integer('max_tokens', 32, 'Tokens generated per request.')
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    'def __init__(self', 'import os\nimport sys\n', 'class Parser:', 'for i in range(',
    '# Copyright', 'return self._'
]


class Server:
  def __init__(self, workdir, slots, max_queue):
    self.port = portpicker.pick_unused_port()
    self.process = subprocess.Popen([
        sys.executable, 'serve.py', f'--workdir={workdir}', f'--port={self.port}',
        f'--slots={slots}', f'--max_queue={max_queue}', *FLAGS.serve_flags
    ], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    self.client = openai.OpenAI(base_url=f'http://127.0.0.1:{self.port}/v1', api_key='unused',
                                max_retries=0, timeout=600)
    deadline = time.time() + 600
    while time.time() < deadline:
      if self.process.poll() is not None:
        raise SystemExit(f'serve.py exited with {self.process.returncode}')
      try:
        if httpx.get(f'http://127.0.0.1:{self.port}/health', timeout=1).status_code == 200:
          self.model = self.client.models.list().data[0].id
          return
      except httpx.TransportError:
        time.sleep(0.5)
    raise SystemExit('serve.py did not start within 600 s')

  def stop(self):
    self.process.terminate()
    self.process.wait(timeout=120)


def one_request(server, index):
  """(generated tokens, time to first token, gaps between chunks) of one streamed request."""
  start = time.perf_counter()
  stream = server.client.completions.create(model=server.model, prompt=PROMPTS[index % 6],
                                            max_tokens=FLAGS.max_tokens, temperature=1.0,
                                            seed=index, stream=True,
                                            stream_options={'include_usage': True})
  arrivals, tokens = [], 0
  for chunk in stream:
    if chunk.choices:
      arrivals.append(time.perf_counter())
    if chunk.usage:
      tokens = chunk.usage.completion_tokens
  return tokens, arrivals[0] - start, np.diff(arrivals[:-1]).tolist()


def level(server, clients: int, one_at_a_time: bool = False) -> dict:
  """N clients, each sending its requests one after another (or all of their requests sent by
  one client, one after another)."""
  def client(c):
    return [
        one_request(server, c * FLAGS.requests_per_client + r)
        for r in range(FLAGS.requests_per_client)
    ]

  start = time.perf_counter()
  if one_at_a_time:
    results = [row for c in range(clients) for row in client(c)]
  else:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      results = [row for rows in pool.map(client, range(clients)) for row in rows]
  elapsed = time.perf_counter() - start
  ttft = [r[1] for r in results]
  gaps = [g for r in results for g in r[2]] or [0.0]
  return dict(clients=clients, requests=len(results), tokens=sum(r[0] for r in results),
              tokens_per_s=sum(r[0] for r in results) / elapsed, ttft_p50=np.percentile(ttft, 50),
              ttft_p99=np.percentile(ttft, 99), itl_p50=np.percentile(gaps, 50),
              itl_p99=np.percentile(gaps, 99))


def main(argv):
  del argv
  logging.getLogger('httpx').setLevel(logging.WARNING)  # not a line per request
  if not os.path.isdir(os.path.join(FLAGS.workdir, 'checkpoints')):
    raise SystemExit(f'no checkpoint in {FLAGS.workdir}; train one first: '
                     f'python train.py --workdir={FLAGS.workdir}')
  levels = [int(n) for n in FLAGS.concurrency]
  compare = FLAGS.compare if FLAGS.compare in levels else max(levels)
  rows, baseline = [], None
  server = Server(FLAGS.workdir, FLAGS.slots, max(levels))
  try:
    level(server, 1)  # warm the HTTP path and every client-side import
    rows = [level(server, n) for n in levels]
  finally:
    server.stop()
  if FLAGS.baseline_slots:
    server = Server(FLAGS.workdir, FLAGS.baseline_slots, max(levels))
    try:
      level(server, 1)
      baseline = level(server, compare, one_at_a_time=True)
    finally:
      server.stop()
  alone = next((r['tokens_per_s'] for r in rows if r['clients'] == 1), rows[0]['tokens_per_s'])
  print(f'{FLAGS.workdir}: {FLAGS.slots} slots, {FLAGS.max_tokens} tokens per request, '
        f'{FLAGS.requests_per_client} requests per client {" ".join(FLAGS.serve_flags)}')
  header = ('| clients | requests | tokens/s | vs 1 client | TTFT p50 / p99 (s) '
            '| ITL p50 / p99 (ms) |')
  if baseline:
    header += f' vs {FLAGS.baseline_slots}-slot server |'
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for r in rows:
    line = (f'| {r["clients"]} | {r["requests"]} | {r["tokens_per_s"]:.1f} | '
            f'{r["tokens_per_s"] / alone:.1f}x | {r["ttft_p50"]:.2f} / {r["ttft_p99"]:.2f} | '
            f'{1000 * r["itl_p50"]:.0f} / {1000 * r["itl_p99"]:.0f} |')
    if baseline:
      line += f' {r["tokens_per_s"] / baseline["tokens_per_s"]:.1f}x |'
    print(line)
  if baseline:
    together = next(r for r in rows if r['clients'] == compare)
    print(f'the {baseline["requests"]} requests of {compare} clients one at a time on a '
          f'{FLAGS.baseline_slots}-slot server: {baseline["tokens_per_s"]:.1f} tokens/s, TTFT '
          f'p50 {baseline["ttft_p50"]:.2f} s, ITL p50 {1000 * baseline["itl_p50"]:.0f} ms; '
          f'{compare} concurrent clients on the {FLAGS.slots}-slot server: '
          f'{together["tokens_per_s"] / baseline["tokens_per_s"]:.1f}x that rate')


if __name__ == '__main__':
  app.run(main)
