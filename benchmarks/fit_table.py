"""The fit table of docs/tpu.md: the smallest v5p and v4 slice that holds each paper config.

  python -m benchmarks.fit_table [--configs=llama_7b,llama_13b,llama_33b,llama_65b]

For each config (seq 2048, 4M-token batch) and chip family it compiles the real train
step with llama_jax.aot on growing slices, with 1, 4 or 16 gradient-accumulation
microbatches, and prints a Markdown row for the first that fits (needs libtpu).
"""

import importlib
import sys
import time

from absl import app, flags, logging

from llama_jax import aot
from llama_jax import metrics as metrics_lib

flags.DEFINE_list('configs', ['llama_7b', 'llama_13b', 'llama_33b', 'llama_65b'], 'Configs.')
flags.DEFINE_list('families', ['v5p', 'v4'], 'TPU families.')
flags.DEFINE_float('assumed_mfu', 0.5, 'MFU assumed for the days estimate.')
FLAGS = flags.FLAGS

PAPER_TOKENS = {'llama_7b': 1.0e12, 'llama_13b': 1.0e12, 'llama_33b': 1.4e12, 'llama_65b': 1.4e12}
BYTES_PER_PARAM = 16  # float32 parameters, two Adam moments, gradients


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  print('| config | slice | chips | mesh | remat | microbatches | HBM per chip | '
        f'days at {FLAGS.assumed_mfu:.0%} MFU (assumed) |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for name in FLAGS.configs:
    for family in FLAGS.families:
      chip = aot.CHIPS[family]
      row = None
      for chips in sorted(aot.SHAPES[chip.dims]):
        config = importlib.import_module(f'configs.{name}').get_config()
        n_params = 6.5e9 * (config.model.dim / 4096)**2 * config.model.n_layers / 32
        if chips < 4 or chips * chip.hbm_bytes < BYTES_PER_PARAM * n_params:
          continue  # the optimizer state alone cannot fit
        _, devices = aot.topology_devices(f'{family}-{chips * chip.cores_per_chip_in_name}')
        for microbatches in (1, 4, 16):
          if (config.train.batch_size // microbatches) % chips:
            continue
          config.train.microbatches = microbatches
          start = time.perf_counter()
          try:
            compiled, built = aot.compile_train_step(config, devices)
            model_config, params, mesh = built.model_config, built.n_params, built.mesh
          except Exception as error:  # the TPU compiler refuses steps that cannot fit
            if 'memory' not in str(error).lower() and 'RESOURCE_EXHAUSTED' not in str(error):
              raise
            print(
                f'  {name} {family} {chips} chips x{microbatches}: does not fit '
                f'({time.perf_counter() - start:.0f}s)', file=sys.stderr, flush=True)
            continue
          memory = aot.memory_per_chip(compiled)['total']
          print(
              f'  {name} {family} {chips} chips x{microbatches}: {memory / 2**30:.1f} GiB '
              f'({time.perf_counter() - start:.0f}s)', file=sys.stderr, flush=True)
          if memory <= chip.hbm_bytes:
            flops = metrics_lib.flops_per_token(model_config, config.train.seq_len, params)
            days = PAPER_TOKENS[name] * flops / (chips * chip.peak_flops * FLAGS.assumed_mfu)
            row = (f'| {name} | {family}-{chips * chip.cores_per_chip_in_name} | {chips} | '
                   f'fsdp {mesh.shape["fsdp"]} | {model_config.remat} | {microbatches} | '
                   f'{memory / 2**30:.1f} of {chip.hbm_bytes / 2**30:.0f} GiB | '
                   f'{days / 86400:.0f} |')
            break
        if row:
          break
      print(row or f'| {name} | no {family} slice up to 512 chips | | | | | | |', flush=True)


if __name__ == '__main__':
  app.run(main)
