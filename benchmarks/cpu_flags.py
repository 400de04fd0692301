"""Which XLA:CPU flags make the CPU train step fastest: each candidate flag set, in a process
of its own, runs `benchmarks.train_step` in float32 and in bfloat16 and prints its tokens/s
and the fastest 2048 x 2048 product at that precision.

  python -m benchmarks.cpu_flags [--config=configs/tiny.py] [--steps=10] [--rounds=2]

The package sets no XLA:CPU flags (docs/cpu_bfloat16.md, "Flags"): this is the measurement
that would change that, one command per kind of machine. The flag sets take turns, round
after round, and each figure is the best of its rounds; the user's own XLA_FLAGS are kept.
"""

import os
import re
import subprocess
import sys

from absl import app, flags

from benchmarks.train_step import cpu_matrix_extensions

FLAGS = flags.FLAGS
flags.DEFINE_string('config', 'configs/tiny.py', 'Config file of the timed step.')
flags.DEFINE_integer('steps', 10, 'Timed steps per run (after 2 warm-up steps).')
flags.DEFINE_integer('rounds', 2, 'Runs of each flag set and precision; the best counts.')

CANDIDATES = ('', '--xla_cpu_use_onednn=true', '--xla_cpu_use_xnnpack=true',
              '--xla_cpu_experimental_onednn_fusion_type=dot')
PRECISIONS = ('float32', 'bfloat16')


def parse(output: str) -> tuple[float, float, str]:
  """(tokens/s, matmul limit in TFLOP/s, its product) from benchmarks.train_step's output."""
  tokens = re.search(r'tokens/s: ([\d,.]+)', output)
  limit = re.search(r'matmul limit: ([\d.]+) TFLOP/s \(([^,]+),', output)
  if not tokens or not limit:
    raise RuntimeError('benchmarks.train_step printed no tokens/s or matmul limit:\n' +
                       output[-2000:])
  return float(tokens.group(1).replace(',', '')), float(limit.group(1)), limit.group(2)


def run(xla_flags: str, precision: str) -> tuple[float, float, str]:
  """One benchmarks.train_step process with `xla_flags` added to the user's XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip(),
             JAX_PLATFORMS='cpu')
  command = [
      sys.executable, '-m', 'benchmarks.train_step', f'--config={FLAGS.config}',
      f'--config.model.dtype={precision}', f'--steps={FLAGS.steps}'
  ]
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f'XLA_FLAGS={env["XLA_FLAGS"]!r}: benchmarks.train_step failed:\n' +
                       done.stderr[-2000:])
  return parse(done.stdout)


def main(argv):
  del argv
  tokens, limits = {}, {}  # (flags, precision) -> the best tokens/s; (TFLOP/s, product)
  for _ in range(FLAGS.rounds):
    for xla_flags in CANDIDATES:
      for precision in PRECISIONS:
        key = (xla_flags, precision)
        step, limit, product = run(xla_flags, precision)
        tokens[key] = max(tokens.get(key, 0), step)
        limits[key] = max(limits.get(key, (0, '')), (limit, product))
  print(f'{FLAGS.config} on cpu ({cpu_matrix_extensions()}), {FLAGS.steps} steps, best of '
        f'{FLAGS.rounds} rounds; the user\'s XLA_FLAGS: {os.environ.get("XLA_FLAGS") or "none"}')
  print('| XLA_FLAGS | ' + ' | '.join(f'{p} tokens/s | {p} matmul TFLOP/s' for p in PRECISIONS) +
        ' |')
  print('| --- ' * (1 + 2 * len(PRECISIONS)) + '|')
  for xla_flags in CANDIDATES:
    cells = []
    for precision in PRECISIONS:
      limit, product = limits[(xla_flags, precision)]
      cells += [f'{tokens[(xla_flags, precision)]:,.0f}', f'{limit:.3f} ({product})']
    print(f'| {xla_flags or "(none)"} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
