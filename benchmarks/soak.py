"""Soak test: a long run with frequent checkpoints; host memory, throughput, kept checkpoints.

  python -m benchmarks.soak [--steps=3000] [--every=50] [--keep=3] [--workdir=/tmp/soak]

Runs train.py (the tiny config shrunk to dim 64 so thousands of steps take minutes) in a
subprocess, samples its resident memory every second, and reports memory and tokens/s
at the start, middle and end of the run, and the checkpoints left on disk.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import psutil
from absl import app, flags

flags.DEFINE_integer('steps', 3000, 'Training steps.')
flags.DEFINE_integer('every', 50, 'Checkpoint every N steps.')
flags.DEFINE_integer('keep', 3, 'checkpoint.keep.')
flags.DEFINE_string('workdir', '/tmp/llama_jax_soak', 'Workdir (emptied first).')
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  shutil.rmtree(FLAGS.workdir, ignore_errors=True)
  overrides = {
      'model.dim': 64,
      'model.n_layers': 2,
      'model.n_heads': 4,
      'train.steps': FLAGS.steps,
      'train.batch_size': 8,
      'train.seq_len': 128,
      'train.eval_every': 0,
      'checkpoint.every_steps': FLAGS.every,
      'checkpoint.keep': FLAGS.keep,
      'logging.every_steps': 50
  }
  command = [
      sys.executable, 'train.py', f'--workdir={FLAGS.workdir}',
      *[f'--config.{k}={v}' for k, v in overrides.items()]
  ]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  memory = []  # (seconds, steps logged, resident bytes)
  start = time.time()
  metrics = os.path.join(FLAGS.workdir, 'metrics.jsonl')
  while process.poll() is None:
    rows = len(open(metrics).readlines()) if os.path.exists(metrics) else 0
    memory.append((time.time() - start, rows, psutil.Process(process.pid).memory_info().rss))
    time.sleep(1)
  assert process.returncode == 0, f'train.py exited with {process.returncode}'
  rows = [json.loads(line) for line in open(metrics)]
  third = len(rows) // 3
  speed = lambda part: sum(r['tokens_per_s'] for r in part) / len(part)
  training = [m for m in memory if m[1] > 0]  # after start-up and compilation
  at = lambda f: training[int(f * (len(training) - 1))][2] / 2**20
  kept = sorted(
      int(n) for n in os.listdir(os.path.join(FLAGS.workdir, 'checkpoints')) if n.isdigit())
  print(f'{FLAGS.steps} steps, a checkpoint every {FLAGS.every}, {time.time() - start:.0f}s')
  print(f'host memory (RSS): {at(0.05):.0f} MiB early, {at(0.5):.0f} MiB midway, '
        f'{at(1.0):.0f} MiB at the end')
  print(f'tokens/s: first third {speed(rows[1:third]):,.0f}, middle '
        f'{speed(rows[third:2 * third]):,.0f}, last third {speed(rows[2 * third:]):,.0f}')
  print(f'checkpoints kept: {kept} (checkpoint.keep={FLAGS.keep})')


if __name__ == '__main__':
  app.run(main)
