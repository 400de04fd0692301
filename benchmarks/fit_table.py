"""The fit tables of docs/tpu.md and docs/llama3.md: the smallest v5p and v4 slice that holds
each config's training step.

  python -m benchmarks.fit_table [--configs=llama_7b,llama_13b,llama_33b,llama_65b]
  python -m benchmarks.fit_table --configs=llama3_8b,llama3_70b,llama3_405b --families=v5p \
      --sequences_per_chip=1

For each config (its own sequence length and global batch) and chip family it compiles the
real train step with llama_jax.aot on growing slices and prints a Markdown row for the
first that fits (needs libtpu). By default it tries 1, 4 or 16 gradient-accumulation
microbatches; --sequences_per_chip=K tries only the microbatch count that gives each chip K
sequences at a time (the global batch stays the config's). Slices that cannot hold the
float32 parameters, Adam moments and gradients, plus one sequence's saved block inputs per
chip (remat full), are skipped without compiling.
"""

import importlib
import sys
import time

from absl import app, flags, logging

from llama_jax import aot
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib

flags.DEFINE_list('configs', ['llama_7b', 'llama_13b', 'llama_33b', 'llama_65b'], 'Configs.')
flags.DEFINE_list('families', ['v5p', 'v4'], 'TPU families.')
flags.DEFINE_integer('sequences_per_chip', 0, 'Sequences per chip per microbatch; 0: try 1, 4 '
                     'and 16 microbatches.')
flags.DEFINE_float('assumed_mfu', 0.5, 'MFU assumed for the days estimate.')
FLAGS = flags.FLAGS

PAPER_TOKENS = {  # training tokens of each paper model, for the days estimate
    'llama_7b': 1.0e12,
    'llama_13b': 1.0e12,
    'llama_33b': 1.4e12,
    'llama_65b': 1.4e12,
    'llama3_8b': 15e12,
    'llama3_70b': 15e12,
    'llama3_405b': 15.6e12
}
BYTES_PER_PARAM = 16  # float32 parameters, two Adam moments, gradients


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  print('| config | seq | batch | slice | chips | mesh | remat | loss chunks | microbatches | '
        f'HBM per chip | days at {FLAGS.assumed_mfu:.0%} MFU (assumed) |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for name in FLAGS.configs:
    for family in FLAGS.families:
      chip = aot.CHIPS[family]
      row = None
      for chips in sorted(aot.SHAPES[chip.dims]):
        config = importlib.import_module(f'configs.{name}').get_config()
        model = model_lib.ModelConfig.from_config(config.model)
        n_params = model_lib.count_params(model_lib.abstract_model(model))
        block_inputs = model.n_layers * config.train.seq_len * model.dim * 2  # one sequence
        if chips < 4 or chip.hbm_bytes < BYTES_PER_PARAM * n_params / chips + block_inputs:
          continue  # the state and one sequence's activations cannot fit
        _, devices = aot.topology_devices(f'{family}-{chips * chip.cores_per_chip_in_name}')
        tries = (1, 4, 16)
        if FLAGS.sequences_per_chip:
          tries = (config.train.batch_size // (chips * FLAGS.sequences_per_chip),)
        for microbatches in tries:
          if microbatches < 1 or (config.train.batch_size // microbatches) % chips:
            continue
          config.train.microbatches = microbatches
          start = time.perf_counter()
          try:
            compiled, built = aot.compile_train_step(config, devices)
            model_config, params, mesh = built.model_config, built.n_params, built.mesh
          except Exception as error:  # the TPU compiler refuses steps that cannot fit
            if 'memory' not in str(error).lower() and 'RESOURCE_EXHAUSTED' not in str(error):
              raise
            reason = str(error).strip().splitlines()[0][:300]
            print(
                f'  {name} {family} {chips} chips x{microbatches}: does not fit '
                f'({time.perf_counter() - start:.0f}s): {reason}', file=sys.stderr, flush=True)
            continue
          memory = aot.memory_per_chip(compiled)['total']
          print(
              f'  {name} {family} {chips} chips x{microbatches}: {memory / 2**30:.1f} GiB '
              f'({time.perf_counter() - start:.0f}s)', file=sys.stderr, flush=True)
          if memory <= chip.hbm_bytes:
            flops = metrics_lib.flops_per_token(model_config, config.train.seq_len, params)
            days = PAPER_TOKENS[name] * flops / (chips * chip.peak_flops * FLAGS.assumed_mfu)
            row = (f'| {name} | {config.train.seq_len} | {config.train.batch_size} | '
                   f'{family}-{chips * chip.cores_per_chip_in_name} | {chips} | '
                   f'fsdp {mesh.shape["fsdp"]} | {model_config.remat} | '
                   f'{config.train.loss_chunks} | {microbatches} | '
                   f'{memory / 2**30:.1f} of {chip.hbm_bytes / 2**30:.0f} GiB | '
                   f'{days / 86400:.0f} |')
            break
        if row:
          break
      print(row or f'| {name} | no {family} slice up to 512 chips | | | | | | | | | |', flush=True)


if __name__ == '__main__':
  app.run(main)
