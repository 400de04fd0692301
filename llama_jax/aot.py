"""Does a config fit a TPU slice or a set of GPUs? Compiles the real train step for a
TPU topology or GPU machines, on any host.

  python -m llama_jax.aot --config=configs/llama_7b.py --topology=v5p-128 [--slices=2] \
      [--assumed_mfu=0.5] [--tokens=1e12] [--config.model.remat=full ...]
  python -m llama_jax.aot --config=configs/llama_7b.py --topology=h100-64

Needs libtpu (`pip install -e '.[tpu]'`) for TPUs, the CUDA compiler (`pip install -e
'.[gpu-aot]'`) for GPUs; not the accelerator. Builds shape-only train state and batch with
their shardings on a mesh of the topology's devices, lowers and compiles the same jitted
step that train.py runs, and prints the per-device memory XLA's compiler reports against
the device's memory, the model FLOPs per step and, from an assumed MFU, the step time and
days to train. Exits 1 when the step does not fit.

GPU topologies (`h100-N`, `h200-N`, `a100-N` (80 GB SXM), `a100-40g-N`, `b200-N`) are N
GPUs in machines of 8, described by XLA's target descriptions shipped in gpu_targets/.
"""

import dataclasses
import importlib.resources
import importlib.util
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags, logging

from llama_jax import config_flag
from llama_jax import experiment as experiment_lib
from llama_jax import hlo
from llama_jax import metrics as metrics_lib
from llama_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # as libtpu names it
  hbm_bytes: int
  peak_flops: float  # dense bfloat16
  cores_per_chip_in_name: int  # v4-8 and v5p-8 count TensorCores: 2 per chip
  dims: int  # torus dimensions
  chip_config: str = 'default'


CHIPS = {
    'v4': Chip('v4', 32 * 2**30, 275e12, 2, 3, 'megacore'),
    'v5p': Chip('v5p', 95 * 2**30, 459e12, 2, 3),
    'v5e': Chip('v5e', 16 * 2**30, 197e12, 1, 2),
    'v5litepod': Chip('v5e', 16 * 2**30, 197e12, 1, 2),
    'v6e': Chip('v6e', 32 * 2**30, 918e12, 1, 2),
}

# Slice shapes by chip count: 3D tori for v4/v5p, 2D for v5e/v6e.
SHAPES = {
    3: {
        1: '1x1x1',
        4: '2x2x1',
        8: '2x2x2',
        16: '2x2x4',
        32: '2x4x4',
        64: '4x4x4',
        128: '4x4x8',
        256: '4x8x8',
        512: '8x8x8'
    },
    2: {
        1: '1x1',
        4: '2x2',
        8: '2x4',
        16: '4x4',
        32: '4x8',
        64: '8x8',
        128: '8x16',
        256: '16x16'
    },
}


@dataclasses.dataclass(frozen=True)
class Gpu:
  target: str  # GpuTargetConfigProto text file in llama_jax/gpu_targets/
  peak_flops: float  # dense bfloat16

  def target_config(self) -> str:
    return importlib.resources.files('llama_jax').joinpath('gpu_targets', self.target).read_text()

  @property
  def hbm_bytes(self) -> int:  # the card's memory, as its target description states it
    return int(re.search(r'device_memory_size: (\d+)', self.target_config()).group(1))


GPUS = {
    'h100': Gpu('h100_sxm.txtpb', 989e12),
    'h200': Gpu('h200.txtpb', 989e12),
    'a100': Gpu('a100_sxm_80.txtpb', 312e12),
    'a100-40g': Gpu('a100_sxm_40.txtpb', 312e12),
    'b200': Gpu('b200.txtpb', 2250e12),
}
GPUS_PER_MACHINE = 8
_GPU_NAME = re.compile(r'(' + '|'.join(sorted(GPUS, key=len, reverse=True)) + r')-(\d+)')


def is_gpu_topology(name: str) -> bool:
  return _GPU_NAME.fullmatch(name) is not None


def parse_gpu_topology(name: str) -> tuple[Gpu, int, str]:
  """'h100-16' -> (H100, 16 GPUs, '1x2x8'): <slices>x<machines>x<GPUs per machine>."""
  match = _GPU_NAME.fullmatch(name)
  if not match:
    raise UserError(f'unknown GPU topology {name!r}; use {", ".join(f"{g}-N" for g in GPUS)} '
                    f'for N GPUs in machines of {GPUS_PER_MACHINE}.')
  gpu, count = GPUS[match.group(1)], int(match.group(2))
  if count < 1 or (count > GPUS_PER_MACHINE and count % GPUS_PER_MACHINE):
    raise UserError(f'{name}: N must be 1..{GPUS_PER_MACHINE} (one machine) or a multiple of '
                    f'{GPUS_PER_MACHINE} (whole machines).')
  per_machine = min(count, GPUS_PER_MACHINE)
  return gpu, count, f'1x{count // per_machine}x{per_machine}'


def gpu_topology_devices(name: str):
  """Compile-only GPU devices for `name` (the CUDA compiler, no GPU needed)."""
  gpu, _, topology_name = parse_gpu_topology(name)
  if importlib.util.find_spec('jax_plugins.xla_cuda13') is None:
    raise UserError(f'compiling for {name} needs the CUDA compiler: '
                    "pip install -e '.[gpu-aot]'.")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform='cuda', target_config=gpu.target_config(),
                                            topology=topology_name)
  except NotImplementedError:  # the CUDA plugin did not register: its library check failed
    raise UserError(f'cannot describe {name}: the CUDA plugin is not loaded; run with '
                    'JAX_PLATFORMS=cpu (python -m llama_jax.aot sets it itself).') from None
  return gpu, topology.devices


def parse_topology(name: str) -> tuple[Chip, int, str]:
  """'v5p-128' -> (chip, 64 chips, 'v5p:4x4x4'), with Cloud TPU's counting rules."""
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  if not match:
    raise UserError(f'unknown topology {name!r}; use a Cloud TPU name such as v4-8..v4-1024, '
                    'v5p-8..v5p-1024, v5e-1..v5e-256 (or v5litepod-N), v6e-1..v6e-256, or a '
                    f'GPU topology: {", ".join(f"{g}-N" for g in GPUS)}.')
  family, count = match.group(1), int(match.group(2))
  chip = CHIPS[family]
  chips = count // chip.cores_per_chip_in_name
  shapes = SHAPES[chip.dims]
  if count % chip.cores_per_chip_in_name or chips not in shapes:
    sizes = ', '.join(str(c * chip.cores_per_chip_in_name) for c in shapes)
    raise UserError(f'{name} is not a slice size; {family}-N takes N in {sizes}.')
  return chip, chips, f'{chip.generation}:{shapes[chips]}'


def topology_devices(name: str, slices: int = 1):
  """The devices of `slices` slices of TPU topology `name`, or of GPU topology `name`
  (compile-only, no accelerator needed): (Chip or Gpu, devices)."""
  if is_gpu_topology(name):
    if slices != 1:
      raise UserError(f'--slices is for TPUs; {name} already counts all its GPUs.')
    return gpu_topology_devices(name)
  chip, chips, topology_name = parse_topology(name)
  dims = [int(d) for d in topology_name.split(':')[1].split('x')]
  host_bounds = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))  # up to 2x2 chips a host
  try:
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform='tpu', topology_name=topology_name,
                                            chip_config_name=chip.chip_config,
                                            chips_per_host_bounds=host_bounds, num_slices=slices)
  except Exception as error:  # libtpu missing, or held by another process
    if 'lockfile' in str(error):
      raise UserError(f'cannot describe TPU topology {topology_name}: another process on this '
                      'machine holds /tmp/libtpu_lockfile (a running JAX program with libtpu '
                      'loaded, such as a training run); let it finish, or set '
                      'ALLOW_MULTIPLE_LIBTPU_LOAD=1 for this compile-only run.') from None
    raise UserError(f'cannot describe TPU topology {topology_name} ({str(error)[:200]}); '
                    "install libtpu with `pip install -e '.[tpu]'` (or name a GPU topology "
                    'such as h100-8).') from None
  return chip, topology.devices


def compile_train_step(config, devices):
  """(compiled step, Experiment) of train.py's step on `devices`, from shapes only."""
  built = experiment_lib.build(config, devices)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       built.abstract_state, built.shardings)
  shape = (config.train.batch_size, config.train.seq_len)
  batch = {
      key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == 'weights' else jnp.int32,
                                sharding=built.batch_sharding)
      for key in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')
  }
  return built.train_step.lower(state, batch).compile(), built


def memory_per_chip(compiled) -> dict:
  """Bytes per chip XLA allocates for the step: arguments, temporaries, outputs, total."""
  analysis = compiled.memory_analysis()
  memory = {
      'arguments': analysis.argument_size_in_bytes,
      'temporaries': analysis.temp_size_in_bytes,
      'outputs': analysis.output_size_in_bytes,
      'aliased': analysis.alias_size_in_bytes,  # outputs written over donated arguments
      'code': analysis.generated_code_size_in_bytes
  }
  memory['total'] = (memory['arguments'] + memory['temporaries'] + memory['outputs'] -
                     memory['aliased'] + memory['code'])
  # Host memory (pinned_host: docs/memory.md's offload modes), apart from the device's total.
  host = (analysis.host_argument_size_in_bytes + analysis.host_temp_size_in_bytes +
          analysis.host_output_size_in_bytes - analysis.host_alias_size_in_bytes)
  if host:
    memory['host'] = host
  return memory


GIB = 2**30
_SUGGESTIONS = ('to fit: model.remat=full, a larger mesh.fsdp (or mesh.tensor), more '
                'train.microbatches, or a bigger slice.')
_GPU_SUGGESTIONS = ('to fit: model.remat=full, a larger mesh.fsdp (or mesh.tensor), more '
                    'train.microbatches, or more GPUs.')
# What a compile on a CPU host cannot know about a GPU run.
_GPU_CAVEATS = ('GPU compile on this host: no autotuning (GEMMs get default Triton configs), '
                'cuDNN workspaces not counted, and JAX preallocates 75% of the card unless '
                'XLA_PYTHON_CLIENT_MEM_FRACTION says more.')


def report(config, topology: str, slices: int, assumed_mfu: float, tokens: float) -> bool:
  """Compiles, prints the figures, and returns whether the step fits in the device memory."""
  chip, devices = topology_devices(topology, slices)
  gpu = isinstance(chip, Gpu)
  unit, memory_name = ('GPU', 'memory per GPU') if gpu else ('chip', 'HBM per chip')
  suggestions = _GPU_SUGGESTIONS if gpu else _SUGGESTIONS
  start = time.perf_counter()
  try:
    compiled, built = compile_train_step(config, devices)
  except Exception as error:  # XLA's TPU compiler refuses a step that cannot fit in HBM
    message = str(error)
    if 'RESOURCE_EXHAUSTED' not in message and 'out of memory' not in message.lower():
      raise
    detail = re.search(r'Ran out of memory[^\n]*', message)
    print(f'topology {topology} x {slices} slice(s): DOES NOT FIT: '
          f'{detail.group(0) if detail else message[:300]}')
    print(suggestions)
    return False
  compile_s = time.perf_counter() - start
  model_config, n_params, mesh = built.model_config, built.n_params, built.mesh
  memory = memory_per_chip(compiled)
  chips = len(devices)
  batch_tokens = config.train.batch_size * config.train.seq_len
  step_flops = metrics_lib.flops_per_token(model_config, config.train.seq_len,
                                           n_params) * batch_tokens
  step_s = step_flops / (chips * chip.peak_flops * assumed_mfu)
  fits = memory['total'] <= chip.hbm_bytes
  where = f'{topology}: {chips} GPUs' if gpu else f'{topology} x {slices} slice(s): {chips} chips'
  print(f'topology {where} ({devices[0].device_kind}), mesh {dict(mesh.shape)}')
  print(f'model {n_params:,} parameters, remat {model_config.remat}, attention '
        f'{model_config.attention}, '
        f'batch {config.train.batch_size} x {config.train.seq_len} in '
        f'{config.train.microbatches} microbatch(es)')
  print(f'compiled in {compile_s:.1f}s')
  device = {k: v for k, v in memory.items() if k != 'host'}
  print(f'{memory_name}: ' + ', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in device.items()) +
        f' of {chip.hbm_bytes / GIB:.0f} GiB -> {"fits" if fits else "DOES NOT FIT"}' +
        (f'; in host memory {memory["host"] / GIB:.2f} GiB' if 'host' in memory else ''))
  text = compiled.as_text()
  print(f'largest arrays on a {unit}: ' +
        ', '.join(f'{shape} {size / GIB:.2f} GiB' for size, shape in hlo.largest_arrays(text, 3)))
  print(f'collectives per step per {unit}: ' +
        (', '.join(f'{kind} {ops} ops {size / GIB:.2f} GiB' for kind,
                   (ops, size) in hlo.collectives(text).items() if ops) or 'none'))
  try:  # (kernels that are custom calls, such as splash, hide their matmuls)
    print(f'matmul FLOPs per step per {unit}, compiled HLO (loops by trip count, custom '
          f'calls not seen): {hlo.dot_flops(text):.3e}')
  except ValueError as error:
    print(f'matmul FLOPs per step per {unit}: not known from the HLO: {error}')
  print(f'model FLOPs per step {step_flops:.3e} (6N + causal attention)')
  print(f'assuming {assumed_mfu:.0%} MFU of {chip.peak_flops / 1e12:.0f} TFLOP/s dense bf16 per '
        f'{unit} (an assumption, not a measurement): step '
        f'{step_s:.2f}s, {batch_tokens / step_s / chips:,.0f} tokens/s/{unit}, '
        f'{tokens:.2e} tokens in {tokens / batch_tokens * step_s / 86400:.1f} days')
  if gpu:
    print(_GPU_CAVEATS)
  if not fits:
    print(suggestions)
  return fits


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  if 'JAX_PLATFORMS' not in os.environ:
    # Compile-only: no local accelerator is used, and the CUDA plugin registers its compiler
    # without checking for CUDA libraries only when CUDA is not a requested platform.
    jax.config.update('jax_platforms', 'cpu')
  FLAGS = flags.FLAGS
  try:
    fits = report(FLAGS.config, FLAGS.topology, FLAGS.slices, FLAGS.assumed_mfu, FLAGS.tokens)
  except UserError as error:
    sys.exit(f'error: {error}')
  sys.exit(0 if fits else 1)


if __name__ == '__main__':
  flags.DEFINE_string('topology', None,
                      'A Cloud TPU slice (v4-8, v5p-128, v5e-16...) or GPUs (h100-8, h200-64...).')
  flags.DEFINE_integer('slices', 1, 'Slices joined over the data-center network.')
  flags.DEFINE_float('assumed_mfu', 0.5, 'MFU assumed for the time estimates (not measured).')
  flags.DEFINE_float('tokens', 1e12, 'Training tokens, for the days estimate.')
  flags.mark_flag_as_required('topology')
  config_flag.run(main, 'configs/llama_7b.py', 'Config file.')
