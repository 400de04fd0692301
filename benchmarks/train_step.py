"""Train-step benchmark: tokens/s, TFLOP/s per device, MFU and peak memory of a config.

  python benchmarks/train_step.py --config=configs/tiny.py [--config.model.remat=none] \
      [--config.mesh.fsdp=-1] [--steps=20]
  python benchmarks/train_step.py --config=configs/llama_7b.py --config.model.n_layers=80 \
      --compile_only    # compile time against depth

Times the real jitted train step (compile excluded) on random tokens, on all devices.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llama_jax import aot
from llama_jax import metrics as metrics_lib
from llama_jax import train_lib, trainer

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.')
flags.DEFINE_integer('steps', 20, 'Timed steps (after 2 warm-up steps).')
flags.DEFINE_bool('compile_only', False, 'Only compile (shape-only state: any model size) and '
                  'print the compile time.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  devices = jax.devices()
  if FLAGS.compile_only:
    start = time.perf_counter()
    aot.compile_train_step(config, devices)
    print(f'{config.model.n_layers} layers of dim {config.model.dim}: compiled in '
          f'{time.perf_counter() - start:.1f}s on {len(devices)} {devices[0].device_kind}')
    return
  built = trainer.setup(config, devices)
  model_config, mesh, step = built.model_config, built.mesh, built.train_step
  state = train_lib.create_sharded_state(0, model_config, built.optimizer, built.shardings)
  batch_size, seq_len = config.train.batch_size, config.train.seq_len
  tokens = np.random.default_rng(0).integers(0, model_config.vocab_size,
                                             (batch_size, seq_len + 1), dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'segment_ids': np.ones((batch_size, seq_len), np.int32),
           'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
           'weights': np.ones((batch_size, seq_len), np.float32)}
  batch = jax.device_put(batch, built.batch_sharding)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / FLAGS.steps

  n_params = built.n_params
  tokens_per_s = batch_size * seq_len / seconds
  tflops = metrics_lib.flops_per_token(model_config, seq_len, n_params) * tokens_per_s / len(
      devices) / 1e12
  peak = metrics_lib.peak_flops_per_device(devices[0], config.logging.cpu_peak_tflops)
  memory = devices[0].memory_stats() or {}
  print(f'device: {len(devices)} x {devices[0].device_kind}; mesh {dict(mesh.shape)}')
  print(f'model: {n_params:,} params, dtype {model_config.dtype}, remat {model_config.remat}, '
        f'attention {model_config.attention}; batch {batch_size} x {seq_len}')
  print(f'compile: {compile_s:.1f}s  step: {seconds * 1e3:.1f}ms  tokens/s: {tokens_per_s:,.0f}  '
        f'TFLOP/s/device: {tflops:.3f}  MFU: {tflops * 1e12 / peak:.1%} (peak {peak / 1e12:g}T)')
  if 'peak_bytes_in_use' in memory:
    print(f'peak memory per device: {memory["peak_bytes_in_use"] / 2**30:.2f} GiB')


if __name__ == '__main__':
  app.run(main)
