"""Where the CPU train step's time goes, ours and PyTorch's, category by category.

  python -m benchmarks.step_profile [--dim=512 --layers=8 --heads=8 --vocab=32000 \
      --seq=256 --batch=8 --precisions=float32 --steps=1]

Builds the steps of `benchmarks.vs_pytorch` (same flags, same shape and remat) and, for
each precision, profiles `--steps` steps of each after their warm-up:
- ours with `jax.profiler` (a perfetto trace): every leaf event of the trace (an HLO
  instruction that runs no nested one, e.g. `dot.41` inside `while.3`) is named by the
  compiled step's HLO, which gives its category (`llama_jax.hlo.instructions`);
- PyTorch with `torch.profiler`: every op's self time (its own, not its children's), by
  op name (`aten::mm`, `aten::addmm`, `aten::bmm` and attention's kernels are matmuls;
  what runs under the benchmark's 'optimizer' label is the optimizer update).
It prints wall ms per step and, per category, ms per step summed over threads, its share
of that sum, and the largest instructions/ops; the matmul rate of both is our step's
matmul FLOPs (from its HLO) over the matmul time. XLA may run independent instructions on
several threads at once, so the sum can exceed the wall time. Some of XLA's instructions
(Eigen's dots and parallel loops) run asynchronously: their event covers the launch, their
'end:' event comes when the work is done; a time when no event runs is shared among the
instructions in flight then, and what remains is printed as running no instruction.
Needs the test extra (torch, transformers).
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
import torch
from absl import app

from benchmarks import vs_pytorch
from llama_jax import hlo

FLAGS = vs_pytorch.FLAGS
_TORCH_MATMUL = re.compile(r'^aten::(mm|addmm|bmm|baddbmm|_scaled_dot_product_\w+)$')
_TORCH_COPY = re.compile(r'^aten::(copy_|clone|contiguous|_to_copy|to|transpose|t|permute|view|'
                         r'reshape|expand|as_strided|_unsafe_view|cat|unsqueeze|slice|select)$')
_TORCH_REDUCE = re.compile(r'sum|mean|norm|softmax|nll_loss|max|min|_log_softmax')


def leaf_events(trace_dir: str) -> list[dict]:
  """The perfetto trace's HLO instruction events that contain no other on their thread,
  each with 'end': when its 'end: NAME' event says it completed (an asynchronous one, such
  as an Eigen dot, completes after its event)."""
  path, = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  by_thread, ends = collections.defaultdict(list), collections.defaultdict(list)
  for event in events:
    if event.get('ph') == 'X' and 'hlo_op' in event.get('args', {}):
      by_thread[event['tid']].append(event)
    elif event.get('ph') == 'X' and event['name'].startswith('end: '):
      ends[event['name'][len('end: '):]].append(event['ts'])
  starts = collections.defaultdict(list)  # the k-th start of an instruction ends k-th
  for thread in by_thread.values():
    for event in thread:
      starts[event['args']['hlo_op']].append(event)
  for name, started in starts.items():
    started.sort(key=lambda e: e['ts'])
    for event, end in zip(started, sorted(ends[name]) + [None] * len(started)):
      event['end'] = max(end or 0.0, event['ts'] + event['dur'])
  leaves = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    for event, following in zip(thread, thread[1:] + [None]):
      if following is None or following['ts'] >= event['ts'] + event['dur']:
        leaves.append(event)
  return leaves


def attributed_us(leaves: list[dict]) -> tuple[list[float], float]:
  """Each leaf's microseconds: its own event, plus an equal share of the time when no event
  ran but it was in flight (started, not yet completed); and the time with neither."""
  points = sorted({t for e in leaves for t in (e['ts'], e['ts'] + e['dur'], e['end'])})
  times, idle = [e['dur'] for e in leaves], 0.0
  order = sorted(range(len(leaves)), key=lambda i: leaves[i]['ts'])
  for start, stop in zip(points, points[1:]):
    running, waiting = False, []
    for i in order:
      event = leaves[i]
      if event['ts'] > start:
        break
      if start < event['ts'] + event['dur']:
        running = True
        break
      if start < event['end']:
        waiting.append(i)
    if running:
      continue
    for i in waiting:
      times[i] += (stop - start) / len(waiting)
    if not waiting:
      idle += stop - start
  return times, idle


def _table(title: str, wall_ms: float, items: list[tuple[str, str, float]], extra: str,
           matmul_flops: int):
  """Print ms per step by category; items: (category, name, ms per step)."""
  per_category = collections.defaultdict(float)
  per_name = collections.defaultdict(float)
  for category, name, ms in items:
    per_category[category] += ms
    per_name[category, name] += ms
  total = sum(per_category.values())
  print(f'{title}: wall {wall_ms:,.0f} ms/step; events summed over threads {total:,.0f} ms/step'
        f'{extra}; matmuls at {matmul_flops / per_category["matmul"] / 1e6:,.1f} GFLOP/s '
        '(our step\'s matmul FLOPs)')
  for category, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
    largest = sorted(((v, n) for (c, n), v in per_name.items() if c == category), reverse=True)
    names = ', '.join(f'{n} {v:,.1f}' for v, n in largest[:4])
    print(f'  {category:<17} {ms:>9,.0f} ms {ms / total:>6.1%}  {names}')


def profile_ours(precision: str, tokens: np.ndarray):
  run, compiled, _, _ = vs_pytorch.our_step(precision, tokens)
  hlo_text = compiled.as_text()
  named = hlo.instructions(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    run(FLAGS.steps)
    wall_ms = (time.perf_counter() - start) * 1e3 / FLAGS.steps
    jax.profiler.stop_trace()
    leaves = leaf_events(trace_dir)
  unknown = hlo.Instruction('other', '?', '?')
  items = []
  times, idle = attributed_us(leaves)
  for event, us in zip(leaves, times):
    instruction = named.get(event['args']['hlo_op'], unknown)
    label = f"{event['args']['hlo_op']} {instruction.shape.split('{')[0]}"
    items.append((instruction.category, label, us / 1e3 / FLAGS.steps))
  threads = len({e['tid'] for e in leaves})
  _table(
      f'ours {precision}', wall_ms, items,
      f'; no instruction running or in flight {idle / 1e3 / FLAGS.steps:,.0f} ms/step; '
      f'{len(leaves) / FLAGS.steps:,.0f} instructions/step on {threads} threads',
      hlo.dot_flops(hlo_text))
  return hlo.dot_flops(hlo_text)


def _torch_category(event, optimizer_ids: set[int]) -> str:
  if _TORCH_MATMUL.match(event.name):
    return 'matmul'
  parent = event.cpu_parent
  while parent is not None:
    if parent.id in optimizer_ids:
      return 'optimizer update'
    parent = parent.cpu_parent
  if _TORCH_COPY.match(event.name):
    return 'layout copy'
  if event.name == 'optimizer' or not event.name.startswith('aten::'):
    return 'other'
  return 'reduce' if _TORCH_REDUCE.search(event.name) else 'elementwise'


def profile_torch(precision: str, tokens: np.ndarray, matmul_flops: int):
  run = vs_pytorch.torch_step(precision, tokens)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    start = time.perf_counter()
    run(FLAGS.steps)
    wall_ms = (time.perf_counter() - start) * 1e3 / FLAGS.steps
  events = profile.events()
  optimizer_ids = {e.id for e in events if e.name == 'optimizer'}
  items = [(_torch_category(e, optimizer_ids), e.name, e.self_cpu_time_total / 1e3 / FLAGS.steps)
           for e in events]
  _table(f'torch {precision}', wall_ms, items, ' (self times)', matmul_flops)


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  tokens = np.random.default_rng(0).integers(0, FLAGS.vocab, (FLAGS.batch, FLAGS.seq + 1),
                                             dtype=np.int32)
  print(f'shape: dim {FLAGS.dim}, {FLAGS.layers} layers, {FLAGS.heads} heads, vocab '
        f'{FLAGS.vocab}, seq {FLAGS.seq}, batch {FLAGS.batch}, remat {FLAGS.remat}; '
        f'{FLAGS.steps} profiled steps; load average {os.getloadavg()[0]:.1f}')
  for precision in FLAGS.precisions:
    profile_torch(precision, tokens, profile_ours(precision, tokens))
    print(f'  (load average {os.getloadavg()[0]:.1f})')


if __name__ == '__main__':
  app.run(main)
