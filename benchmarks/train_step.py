"""Train-step benchmark: tokens/s, TFLOP/s per device, MFU and peak memory of a config.

  python -m benchmarks.train_step --config=configs/tiny.py [--config.model.remat=none] \
      [--config.mesh.fsdp=-1] [--steps=20]
  python -m benchmarks.train_step --config=configs/llama_7b.py --config.model.n_layers=80 \
      --compile_only    # compile time against depth

Times the real jitted train step (compile excluded) on random tokens, on all devices.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from llama_jax import aot, config_flag
from llama_jax import experiment as experiment_lib
from llama_jax import metrics as metrics_lib

FLAGS = flags.FLAGS


def batch_of(tokens: np.ndarray) -> dict:
  """A train batch of [batch, length + 1] tokens, one document per row: [batch, length]
  numpy arrays."""
  batch_size, seq_len = tokens.shape[0], tokens.shape[1] - 1
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': np.ones((batch_size, seq_len), np.int32),
      'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
      'weights': np.ones((batch_size, seq_len), np.float32)
  }


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict:
  """Random tokens as one document per row."""
  return batch_of(
      np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len + 1),
                                           dtype=np.int32))


# /proc/cpuinfo flags of the CPU matrix extensions that XLA:CPU's bfloat16 kernels use.
MATRIX_EXTENSIONS = (('amx_bf16', 'AMX'), ('avx512_bf16', 'AVX-512 BF16'))


def cpu_matrix_extensions(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's matrix extensions, e.g. 'AMX, AVX-512 BF16'; 'no AMX or AVX-512 BF16' if none."""
  try:
    with open(cpuinfo) as f:
      flags = set(next((line for line in f if line.startswith('flags')), '').split())
  except OSError:
    return 'matrix extensions unknown'
  found = [name for flag, name in MATRIX_EXTENSIONS if flag in flags]
  return ', '.join(found) or 'no ' + ' or '.join(name for _, name in MATRIX_EXTENSIONS)


def _product_flops_per_s(dtype, out_dtype, size: int, repeats: int) -> float:
  """FLOP/s of the jitted [size, size] @ [size, size] product, best of `repeats`."""
  a = jnp.ones((size, size), dtype)
  product = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=out_dtype))
  product(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    product(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def matmul_limit(precision: str, size: int = 2048, repeats: int = 5) -> tuple[float, str]:
  """(FLOP/s, which product) of the fastest matmul this device offers at `precision`:
  float32 x float32, or bfloat16 x bfloat16 returning bfloat16 or float32, whichever is
  faster (XLA:CPU's fast bfloat16 kernels return float32; docs/cpu_bfloat16.md)."""
  if precision == 'float32':
    return _product_flops_per_s(jnp.float32, jnp.float32, size, repeats), 'float32'
  products = {
      f'{precision} -> {result}': _product_flops_per_s(precision, result, size, repeats)
      for result in (precision, 'float32')
  }
  name = max(products, key=products.get)
  return products[name], name


def measure(config, devices, timed_steps: int) -> dict:
  """Compiles and times train.py's step on random tokens; returns its figures.

  Keys: compile_s, step_s, tokens_per_s, tflops_per_device, mfu (None without a known
  peak), compiled_gib (XLA's memory analysis per device), peak_gib (the allocator's peak,
  None where the device does not report it), and `built` (the Experiment).
  """
  built = experiment_lib.build(config, devices)
  model_config = built.model_config
  state = built.create_state(0)
  batch_size, seq_len = config.train.batch_size, config.train.seq_len
  batch = jax.device_put(random_batch(model_config.vocab_size, batch_size, seq_len),
                         built.batch_sharding)
  start = time.perf_counter()
  compiled = built.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(timed_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / timed_steps
  tokens_per_s = batch_size * seq_len / step_s
  tflops = metrics_lib.flops_per_token(model_config, seq_len,
                                       built.n_params) * tokens_per_s / (len(devices) * 1e12)
  peak = metrics_lib.peak_flops_per_device(devices[0], config.logging.cpu_peak_tflops)
  memory = devices[0].memory_stats() or {}
  return {
      'compile_s': compile_s,
      'step_s': step_s,
      'tokens_per_s': tokens_per_s,
      'tflops_per_device': tflops,
      'mfu': tflops * 1e12 / peak if peak else None,
      'compiled_gib': aot.memory_per_chip(compiled)['total'] / 2**30,
      'peak_gib': memory['peak_bytes_in_use'] / 2**30 if 'peak_bytes_in_use' in memory else None,
      'built': built
  }


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
  result = measure(config, devices, FLAGS.steps)
  built = result['built']
  model_config = built.model_config
  extensions = f' ({cpu_matrix_extensions()})' if devices[0].platform == 'cpu' else ''
  print(f'device: {len(devices)} x {devices[0].device_kind}{extensions}; mesh '
        f'{dict(built.mesh.shape)}')
  print(f'model: {built.n_params:,} params, dtype {model_config.dtype}, remat '
        f'{model_config.remat}, attention {model_config.attention}; batch '
        f'{config.train.batch_size} x {config.train.seq_len}')
  mfu = f'{result["mfu"]:.1%}' if result['mfu'] is not None else 'n/a (peak unknown)'
  print(f'compile: {result["compile_s"]:.1f}s  step: {result["step_s"] * 1e3:.1f}ms  '
        f'tokens/s: {result["tokens_per_s"]:,.0f}  TFLOP/s/device: '
        f'{result["tflops_per_device"]:.3f}  MFU: {mfu}')
  if devices[0].platform == 'cpu':  # no known peak: the fastest product at this precision
    limit, product = matmul_limit(model_config.dtype)
    print(f'matmul limit: {limit / 1e12:.3f} TFLOP/s ({product}, 2048 x 2048); the step reaches '
          f'{result["tflops_per_device"] * 1e12 / limit:.0%} of it')
  print(f'memory per device: {result["compiled_gib"]:.2f} GiB compiled' +
        (f', {result["peak_gib"]:.2f} GiB allocator peak' if result['peak_gib'] else ''))


if __name__ == '__main__':
  flags.DEFINE_integer('steps', 20, 'Timed steps (after 2 warm-up steps).')
  flags.DEFINE_bool(
      'compile_only', False, 'Only compile (shape-only state: any model size) and '
      'print the compile time.')
  config_flag.run(main, 'configs/tiny.py', 'Config file.')
