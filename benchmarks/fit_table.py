"""The fit tables of docs/tpu.md, docs/llama3.md and docs/gpu.md: the smallest v5p and v4
slice (or number of GPUs) that holds each config's training step.

  python -m benchmarks.fit_table [--configs=llama_7b,llama_13b,llama_33b,llama_65b]
  python -m benchmarks.fit_table --configs=llama3_8b,llama3_70b,llama3_405b --families=v5p \
      --sequences_per_chip=1
  python -m benchmarks.fit_table --gpu [--configs=...]

For each config (its own sequence length and global batch) and chip family it compiles the
real train step with llama_jax.aot on growing slices and prints a Markdown row for the
first that fits (needs libtpu). By default it tries 1, 4 or 16 gradient-accumulation
microbatches; --sequences_per_chip=K tries only the microbatch count that gives each chip K
sequences at a time (the global batch stays the config's). Slices that cannot hold the
float32 parameters, Adam moments and gradients, plus one sequence's saved block inputs per
chip (remat full), are skipped without compiling.

--gpu (needs the gpu-aot extra) prints docs/gpu.md's tables instead: small.py on one H100;
each config at its batch on the fewest H100s and H200s that hold it (powers of two, one
sequence per GPU per microbatch: the least activation memory); 7B and 13B on one 8-GPU
machine (the fewest microbatches of 16, 4 or 1 sequences per GPU that fit); and 7B on
h100-8 with the projections' token axes flattened (the CPU layout) or kept (einsum, the
TPU and GPU layout; see llama_jax.projection.project) on three meshes, by memory and
collectives per GPU.

--one_device prints docs/memory.md's table: each config in each memory mode on one H200,
one H100 and one v5p chip, at batch 1 x seq_len and at --accumulated_batch sequences in
as many microbatches; GiB per device (and in host memory). A mode whose device bytes per
parameter (benchmarks/memory_modes.py) times the parameter count exceed the device is not compiled.
"""

import contextlib
import importlib
import os
import sys
import time
from unittest import mock

import jax
from absl import app, flags, logging

from benchmarks import memory_modes
from llama_jax import aot, cross_entropy, hlo, projection
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax.errors import ConfigError

flags.DEFINE_list('configs', ['llama_7b', 'llama_13b', 'llama_33b', 'llama_65b'], 'Configs.')
flags.DEFINE_list('families', ['v5p', 'v4'], 'TPU families.')
flags.DEFINE_integer('sequences_per_chip', 0, 'Sequences per chip per microbatch; 0: try 1, 4 '
                     'and 16 microbatches.')
flags.DEFINE_float('assumed_mfu', 0.5, 'MFU assumed for the days estimate.')
flags.DEFINE_bool('gpu', False, 'The GPU tables (H100, H200) instead of the TPU one.')
flags.DEFINE_bool('one_device', False, 'The memory modes on one H200, H100 and v5p chip.')
flags.DEFINE_list('modes', [], '--one_device: these modes only (names as printed).')
flags.DEFINE_list('devices', ['h200-1', 'h100-1', 'v5p-2'], '--one_device: the devices.')
flags.DEFINE_list('batches', ['1', '16'], '--one_device: global batches (each sequence its own '
                  'microbatch).')
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


def tpu_table():
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


GIB = 2**30
GPU_FAMILIES = ('h100', 'h200')
MACHINE = 'h100-8'  # one 8-GPU machine
LAYOUT_MESHES = ({}, {'sequence': 2}, {'tensor': 2})  # fsdp takes the rest of the 8 GPUs


@contextlib.contextmanager
def flat_tokens():
  """The CPU layout on any platform: projections and the loss flatten [batch, length]."""
  with mock.patch.object(projection, 'compute_platform', lambda: 'cpu'), \
      mock.patch.object(cross_entropy, 'compute_platform', lambda: 'cpu'):
    yield


def gpu_compile(name, topology, microbatches, mesh=None, layout='einsum'):
  """Compiles config `name` for GPU `topology`: a dict of what the rows print."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.train.microbatches = microbatches
  config.mesh.update(mesh or {})
  gpu, devices = aot.topology_devices(topology)
  start = time.perf_counter()
  with flat_tokens() if layout == 'flat' else contextlib.nullcontext():
    compiled, built = aot.compile_train_step(config, devices)
  seconds = time.perf_counter() - start
  memory = aot.memory_per_chip(compiled)['total']
  print(
      f'  {name} {topology} x{microbatches} {dict(mesh or {})} {layout}: '
      f'{memory / GIB:.1f} GiB ({seconds:.0f}s)', file=sys.stderr, flush=True)
  flops = metrics_lib.flops_per_token(built.model_config, config.train.seq_len, built.n_params)
  days = (PAPER_TOKENS[name] * flops / (len(devices) * gpu.peak_flops * FLAGS.assumed_mfu) /
          86400 if name in PAPER_TOKENS else None)
  mesh_text = ' x '.join(
      f'{axis} {size}' for axis, size in built.mesh.shape.items() if size > 1 or axis == 'fsdp')
  return dict(config=config, gpu=gpu, memory=memory, fits=memory <= gpu.hbm_bytes, days=days,
              mesh=mesh_text, remat=built.model_config.remat,
              collectives=hlo.collectives(compiled.as_text()))


def gpu_row(name, topology, fit) -> str:
  config, days = fit['config'], fit['days']
  return (f'| {name} | {config.train.seq_len} | {config.train.batch_size} | {topology} | '
          f'{fit["mesh"]} | {fit["remat"]} | {config.train.loss_chunks} | '
          f'{config.train.microbatches} | {fit["memory"] / GIB:.1f} of '
          f'{fit["gpu"].hbm_bytes / GIB:.0f} GiB | {f"{days:.0f}" if days else "—"} |')


def fewest_gpus(name, family) -> str:
  """The row of the fewest GPUs (1, 2, 4, ... 512) holding `name` at one sequence per GPU
  per microbatch; counts that cannot hold the state and one sequence's block inputs are
  skipped without compiling."""
  gpu = aot.GPUS[family]
  config = importlib.import_module(f'configs.{name}').get_config()
  model = model_lib.ModelConfig.from_config(config.model)
  n_params = model_lib.count_params(model_lib.abstract_model(model))
  block_inputs = model.n_layers * config.train.seq_len * model.dim * 2
  for gpus in (2**k for k in range(10)):
    if gpu.hbm_bytes < BYTES_PER_PARAM * n_params / gpus + block_inputs:
      continue
    fit = gpu_compile(name, f'{family}-{gpus}', config.train.batch_size // gpus)
    if fit['fits']:
      return gpu_row(name, f'{family}-{gpus}', fit)
  return f'| {name} | no {family} count up to 512 | | | | | | | | |'


def one_machine(name) -> tuple[str, int]:
  """The row of `name` on h100-8 at the fewest microbatches that fit, and that count."""
  batch = importlib.import_module(f'configs.{name}').get_config().train.batch_size
  gpus = aot.parse_gpu_topology(MACHINE)[1]
  for sequences_per_gpu in (16, 4, 1):
    microbatches = batch // (gpus * sequences_per_gpu)
    fit = gpu_compile(name, MACHINE, microbatches)
    if fit['fits']:
      return gpu_row(name, MACHINE, fit), microbatches
  return f'| {name} | does not fit {MACHINE} | | | | | | | | |', None


def gpu_tables():
  start = time.perf_counter()
  header = ('| config | seq | batch | GPUs | mesh | remat | loss chunks | microbatches | '
            f'memory per GPU | days at {FLAGS.assumed_mfu:.0%} MFU (assumed) |\n'
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  print('small.py on one H100, the configs on the fewest H100s and H200s\n')
  print(header)
  small = next((fit for microbatches in (1, 4, 16)
                if (fit := gpu_compile('small', 'h100-1', microbatches))['fits']), None)
  print(
      gpu_row('small', 'h100-1', small) if small else '| small | does not fit h100-1 |', flush=True)
  for name in FLAGS.configs:
    for family in GPU_FAMILIES:
      print(fewest_gpus(name, family), flush=True)
  print(f'\nOne 8-GPU machine ({MACHINE})\n')
  print(header)
  microbatches = None
  for name in ('llama_7b', 'llama_13b'):
    row, fitting = one_machine(name)
    microbatches = microbatches or fitting
    print(row, flush=True)
  print(f'\nProjection layout: llama_7b on {MACHINE}, {microbatches} microbatches; '
        'collectives per step per GPU\n')
  print('| mesh | layout | memory per GPU | ' + ' | '.join(hlo.COLLECTIVES) + ' |')
  print('| --- | --- | --- |' + ' --- |' * len(hlo.COLLECTIVES))
  for mesh in LAYOUT_MESHES:
    for layout in ('flat', 'einsum'):
      fit = gpu_compile('llama_7b', MACHINE, microbatches, mesh, layout)
      sent = [
          f'{ops:,} ops, {size / GIB:.1f} GiB' if ops else '—'
          for ops, size in (fit['collectives'].get(kind, (0, 0)) for kind in hlo.COLLECTIVES)
      ]
      print(
          f'| {fit["mesh"]} | {layout} | {fit["memory"] / GIB:.2f} GiB | ' + ' | '.join(sent) +
          ' |', flush=True)
  print(f'\n{time.perf_counter() - start:.0f} s in all')


def mode_config(name, mode, batch):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.train.update(batch_size=batch, microbatches=batch)
  return memory_modes.apply(config, mode)


def one_device_table():
  start = time.perf_counter()
  modes = FLAGS.modes or list(memory_modes.MODES)
  unknown = set(modes) - set(memory_modes.MODES)
  if unknown:
    raise app.UsageError(f'unknown --modes {", ".join(sorted(unknown))}; use any of '
                         f'{", ".join(memory_modes.MODES)}.')
  print('| config | mode | bytes/param device + host | batch | ' + ' | '.join(FLAGS.devices) + ' |')
  print('| --- | --- | --- | --- |' + ' --- |' * len(FLAGS.devices))
  for name in FLAGS.configs:
    for mode in modes:
      on_device, on_host = memory_modes.MODES[mode][1:]
      for batch in map(int, FLAGS.batches):
        config = mode_config(name, mode, batch)
        n_params = model_lib.count_params(
            model_lib.abstract_model(model_lib.ModelConfig.from_config(config.model)))
        cells = []
        for topology in FLAGS.devices:
          chip, devices = aot.topology_devices(topology)
          if on_device * n_params > chip.hbm_bytes:
            cells.append(f'no ({on_device * n_params / GIB:.0f} GiB of state)')
            continue
          began = time.perf_counter()
          try:
            memory = aot.memory_per_chip(aot.compile_train_step(config, devices)[0])
          except ConfigError:  # host memory on compile-only GPU devices (jax 0.10.2)
            cells.append('not compilable here (no host memory kind)')
            continue
          except Exception as error:  # the TPU compiler refuses steps that cannot fit
            if 'memory' not in str(error).lower() and 'RESOURCE_EXHAUSTED' not in str(error):
              raise
            cells.append('no (compiler: out of memory)')
            continue
          host = f' + {memory["host"] / GIB:.1f} host' if 'host' in memory else ''
          fits = 'fits' if memory['total'] <= chip.hbm_bytes else 'no'
          cells.append(f'{fits}: {memory["total"] / GIB:.1f}{host} GiB')
          print(
              f'  {name} {mode} x{batch} {topology}: {cells[-1]} '
              f'({time.perf_counter() - began:.0f}s)', file=sys.stderr, flush=True)
        print(
            f'| {name} | {mode} | {on_device} + {on_host} | {batch} x {config.train.seq_len} | ' +
            ' | '.join(cells) + ' |', flush=True)
  print(f'\n{time.perf_counter() - start:.0f} s in all')


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  if FLAGS.one_device:
    if 'JAX_PLATFORMS' not in os.environ:  # compile-only: see llama_jax.aot.main
      jax.config.update('jax_platforms', 'cpu')
    one_device_table()
  elif FLAGS.gpu:
    if 'JAX_PLATFORMS' not in os.environ:  # compile-only: see llama_jax.aot.main
      jax.config.update('jax_platforms', 'cpu')
    gpu_tables()
  else:
    tpu_table()


if __name__ == '__main__':
  app.run(main)
