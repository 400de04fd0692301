"""Failures at pod scale, with 2 processes on loopback: restores every process agrees on,
SIGTERM on one host only, the hang watchdog, and the goodput account."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama_jax import goodput as goodput_lib
from llama_jax import train_loop
from llama_jax import watchdog as watchdog_lib
from llama_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # whole runs in subprocesses


def test_only_process_1_cannot_read_the_newest_checkpoint(corpus_dirs, train_command, tmp_path,
                                                          truncate_largest_file, pod, metrics_rows):
  workdir = str(tmp_path / 'run')
  run = lambda steps: train_command(
      *corpus_dirs, workdir, **{
          'train.steps': steps,
          'train.eval_every': 0,
          'checkpoint.every_steps': 2
      })
  logs = tmp_path / 'logs'
  pod.finish(pod.launch(run(4), logs))
  # Damage a data file that only process 1 reads back (its own shards of the parameters).
  shards = os.path.join(workdir, 'checkpoints', '4', 'params', 'ocdbt.process_1')
  truncate_largest_file(shards)

  outputs = pod.finish(pod.launch(run(6), logs), timeout=300)  # raises if anything hangs
  assert 'process 1 cannot read checkpoint' in outputs[1]
  assert 'cannot read checkpoint' not in outputs[0]  # process 0 could, and still fell back
  assert 'Resumed from step 2' in outputs[0]
  checkpoints = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert '4.unreadable' in checkpoints and '6' in checkpoints  # set aside, not deleted
  steps = [row['step'] for row in metrics_rows(workdir)]
  assert steps[-2:] == [5, 6]  # both processes went on from step 2 together


def test_sigterm_on_one_host_stops_every_process_at_the_same_step(corpus_dirs, train_command,
                                                                  tmp_path, pod):
  workdir = str(tmp_path / 'run')
  running = pod.launch(
      train_command(*corpus_dirs, workdir, **{
          'train.steps': 1000,
          'train.eval_every': 0,
          'checkpoint.every_steps': 1000
      }), tmp_path / 'logs')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert time.time() < deadline and running[0].poll() is None, 'the run did not start'
    time.sleep(0.1)
  running[1].send_signal(signal.SIGTERM)  # a single preempted VM
  outputs = pod.finish(running)
  stopped = int(outputs[0].split('Stopped at step ')[1].split()[0])
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stopped)]  # one checkpoint
  assert 'received SIGTERM' in outputs[1] and 'received SIGTERM' not in outputs[0]


def test_a_hang_prints_every_stack_exits_75_and_the_run_resumes(corpus_dirs, train_command,
                                                                tmp_path):
  workdir = str(tmp_path / 'run')
  command = train_command(
      *corpus_dirs, workdir, **{
          'train.steps': 8,
          'train.eval_every': 0,
          'checkpoint.every_steps': 2,
          'train.hang_timeout_s': 3
      })
  # The same train.py, with a data source that blocks forever after its 5th batch.
  hanging = tmp_path / 'hanging_train.py'
  hanging.write_text('import os, runpy, sys, threading\n'
                     'sys.path[0] = os.getcwd()  # as `python train.py` from the repository\n'
                     'from llama_jax.data import pipeline\n'
                     'real = pipeline.global_batches\n'
                     'def stuck_after_5(*args):\n'
                     '  for i, batch in enumerate(real(*args)):\n'
                     '    if i == 5:\n'
                     '      threading.Event().wait()\n'
                     '    yield batch\n'
                     'pipeline.global_batches = stuck_after_5\n'
                     f'sys.argv = {command[1:]!r}\n'
                     "runpy.run_path('train.py', run_name='__main__')\n")
  done = subprocess.run([sys.executable, str(hanging)], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == watchdog_lib.HANG_EXIT_CODE, done.stderr[-3000:]
  assert 'process 0: no train step completed for' in done.stderr and 'after step 5' in done.stderr
  assert 'Thread 0x' in done.stderr and 'stuck_after_5' in done.stderr  # every thread's stack
  resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step 4' in resumed.stdout
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8'))


def test_goodput_accounts_data_waits_evaluation_checkpoints_and_redone_steps(
    corpus_dirs, small_config, tmp_path, monkeypatch, metrics_rows):
  real = pipeline.global_batches

  def slow(*args):  # every batch takes 0.3 s to arrive
    for batch in real(*args):
      time.sleep(0.3)
      yield batch

  monkeypatch.setattr(pipeline, 'global_batches', slow)
  workdir = str(tmp_path / 'run')
  config = small_config(*corpus_dirs, **{
      'train.steps': 6,
      'train.eval_every': 3,
      'checkpoint.every_steps': 2
  })
  start = time.perf_counter()
  train_loop.train(config, workdir)
  wall = time.perf_counter() - start
  rows = metrics_rows(workdir)
  last = [row for row in rows if 'goodput/wall_s' in row][-1]
  assert last['goodput/data_s'] >= 6 * 0.3 and last['goodput/data_stalls'] == 6
  assert last['goodput/compile_s'] > 0 and last['goodput/checkpoint_s'] > 0
  assert last['goodput/evaluation_s'] > 0 and last['goodput/redone_steps'] == 0
  assert last['goodput/wall_s'] <= wall
  parts = [last[f'goodput/{name}_s'] for name in ('steps', *goodput_lib.MEASURED)]
  assert sum(parts) == pytest.approx(last['goodput/wall_s'], rel=1e-6)

  # A crash after step 6 that lost its last checkpoint: the restart redoes steps 5 and 6.
  os.rename(os.path.join(workdir, 'checkpoints', '6'), str(tmp_path / 'lost'))
  config.train.steps = 8
  train_loop.train(config, workdir)
  rows = metrics_rows(workdir)
  last = [row for row in rows if 'goodput/wall_s' in row][-1]
  assert last['goodput/redone_steps'] == 2 and last['goodput/lost_s'] > 0
  assert last['goodput/fraction'] == pytest.approx(
      (last['goodput/steps_s'] - last['goodput/lost_s']) / last['goodput/wall_s'])


def test_goodput_lost_time_is_the_redone_share_of_step_time():
  now = [0.0]
  account = goodput_lib.Goodput(redone_steps=1, clock=lambda: now[0])
  with account.timing('compile'):
    now[0] += 2
  for _ in range(4):  # 4 steps of 1 s, the first one redone
    now[0] += 1
    account.step_done()
  with account.timing('data'):
    now[0] += 0.5
  row = account.row()
  assert row['goodput/steps_s'] == 4 and row['goodput/lost_s'] == 1
  assert row['goodput/fraction'] == pytest.approx(3 / 6.5)
  assert row['goodput/data_stalls'] == 1
  assert np.isclose(sum(row[f'goodput/{n}_s'] for n in ('steps', *goodput_lib.MEASURED)), 6.5)
