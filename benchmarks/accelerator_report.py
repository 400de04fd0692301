"""One command that proves a run on the accelerator at hand: correctness, speed, capacity.

  python -m benchmarks.accelerator_report [--output=accelerator_report.md] [--smoke]
      [--sections=setup,correctness,speed,capacity,decoding] [--steps=10]

Prints Markdown and writes it to --output:
  setup        device kind and count, JAX / jaxlib / CUDA or libtpu versions;
  correctness  one float32 train step on the accelerator against the same step on the
               host CPU; every attention implementation the platform runs against
               `reference` (forward and gradients, packed rows, grouped-query heads);
               KV-cache generation against a loop of full forward passes;
  speed        configs/small.py at seq 2048 in bfloat16: tokens/s, TFLOP/s per device, MFU
               and memory for each attention implementation and remat policy;
  capacity     the largest LLaMA-shaped model whose train step (batch 1 x 2048, remat
               full) fits one device in each memory mode (docs/memory.md), by compiling
               and reading XLA's memory analysis;
  decoding     KV-cache decoding of 7B- and 13B-shaped models in bfloat16 (random weights),
               tokens/s at batch 1 and 16.
--smoke runs every section with CPU-sized shapes (the test suite runs it).

  python -m benchmarks.accelerator_report --compile_only --topology=h100-8 [--smoke]

compiles, without the accelerator (llama_jax.aot's compile-only devices; GPUs need the
gpu-aot extra), the sections that need no execution, for one device of the topology:
  setup        the device and versions;
  capacity     as above, against the device's memory;
  memory       the speed section's train step per remat policy: XLA's memory analysis;
  kernels      each attention implementation the platform runs, forward and backward at
               the correctness section's shape: the custom calls it compiled to.
"""

import collections
import dataclasses
import importlib.metadata
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from benchmarks import attention as attention_benchmark
from benchmarks import memory_modes
from benchmarks import train_step as train_step_benchmark
from llama_jax import aot, generate
from llama_jax import attention as attention_lib
from llama_jax import experiment as experiment_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sharding_lib
from llama_jax.errors import ConfigError, UserError

FLAGS = flags.FLAGS

GIB = 2**30
# Paper shapes (Table 2), smallest first: name, dim, heads, layers.
PAPER_SHAPES = (('small', 2048, 16, 16), ('7B', 4096, 32, 32), ('13B', 5120, 40, 40),
                ('33B', 6656, 52, 60), ('65B', 8192, 64, 80))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The shapes each section uses."""
  speed_config: str  # a config module
  speed_overrides: dict  # applied on top of it
  remats: tuple  # remat policies timed with `auto` attention
  capacity_shapes: tuple  # (name, dim, heads, layers), smallest first
  capacity_vocab: int
  capacity_seq: int
  capacity_modes: tuple  # names in benchmarks/memory_modes.py
  decode_shapes: tuple  # (name, dim, heads, layers)
  decode_batches: tuple
  decode_prompt: int
  decode_new_tokens: int
  attention_shape: tuple  # batch, length, heads, kv_heads, head_dim


FULL = Plan('configs.small', {}, ('none', 'save_dots', 'full'), PAPER_SHAPES, 32000, 2048,
            ('float32', 'bf16 state', 'bf16 weights + host master', 'bf16 weights + no master'),
            (('7B', 4096, 32, 32), ('13B', 5120, 40, 40)), (1, 16), 128, 128, (2, 512, 8, 2, 128))
SMOKE = Plan('configs.tiny', dict(seq_len=128, batch_size=4), ('save_dots', 'full'),
             (('a', 64, 4, 2), ('b', 128, 4, 2)), 512, 128, ('float32', 'bf16 weights + no master'),
             (('a', 64, 4, 2),), (1, 2), 8, 8, (2, 128, 4, 2, 32))
# The CPU reports no memory limit; this one lets shape a fit and b only with one layer in
# both smoke modes (b with 2 layers: 8.48 MiB in bfloat16, with 1 layer: 7.74 MiB in float32).
SMOKE_MEMORY_LIMIT = 8.3 * 2**20
RUN_SECTIONS = ('setup', 'correctness', 'speed', 'capacity', 'decoding')
COMPILE_ONLY_SECTIONS = ('setup', 'capacity', 'memory', 'kernels')


def device_memory_limit(device) -> float:
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit', SMOKE_MEMORY_LIMIT)


def load_config(plan: Plan, **overrides):
  config = importlib.import_module(plan.speed_config).get_config()
  config.train.update(plan.speed_overrides)
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  return config


def count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines)


def setup_section(devices, limit, compile_only: bool) -> str:
  versions = {name: importlib.metadata.version(name) for name in ('jax', 'jaxlib', 'flax')}
  for plugin in ('jax-cuda13-plugin', 'jax-cuda12-plugin', 'libtpu'):
    try:
      versions[plugin] = importlib.metadata.version(plugin)
    except importlib.metadata.PackageNotFoundError:
      pass
  if compile_only:  # devices of a topology description: no client, no allocator
    rows = [[
        'device', f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform}, '
        'compile-only)'
    ], ['memory per device', f'{limit / GIB:.1f} GiB']]
  else:
    platform = devices[0].client.platform_version
    rows = [['device', f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform})'],
            ['platform', platform.splitlines()[0] if platform else '?'],
            [
                'memory per device',
                f'{limit / GIB:.1f} GiB' if devices[0].memory_stats() else 'not reported'
            ]]
  rows += [[name, version] for name, version in versions.items()]
  return table(['what', 'value'], rows)


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_train_step(plan: Plan) -> list:
  """One float32 step on the accelerator and on the host CPU: loss and gradient norm.

  With no accelerator (--smoke on a CPU) the other side is the step sharded over several
  CPU devices (fsdp), so the check still compares two different programs.
  """
  config = load_config(plan, **{'model.dtype': 'float32'})
  cpus = jax.devices('cpu')[:config.train.batch_size]
  if jax.default_backend() != 'cpu':
    cpus, against = cpus[:1], 'host CPU'
  elif len(cpus) > 1:
    against = f'{len(cpus)} CPU devices (fsdp)'
  else:
    return []  # one CPU device: nothing independent to compare with
  results = []
  for devices in (jax.devices()[:1], cpus):
    built = experiment_lib.build(config, devices)
    state = built.create_state(0)
    batch = train_step_benchmark.random_batch(built.model_config.vocab_size,
                                              config.train.batch_size, config.train.seq_len)
    _, metrics = built.train_step(state, jax.device_put(batch, built.batch_sharding))
    results.append((built.model_config.attention, jax.device_get(metrics)))
  (attention, accelerator), (_, host) = results
  rows = []
  for key, tolerance in (('loss', 1e-4), ('grad_norm', 1e-3)):
    error = relative_error(accelerator[key], host[key])
    rows.append([
        f'train step {key} ({attention} attention) vs {against}',
        f'{float(accelerator[key]):.6f} vs {float(host[key]):.6f}',
        f'{error:.1e} (tolerance {tolerance:g})', 'pass' if error <= tolerance else 'FAIL'
    ])
  return rows


def check_attention(plan: Plan) -> list:
  """Each implementation the platform runs against `reference`: forward and gradients."""
  batch, length, heads, kv_heads, head_dim = plan.attention_shape
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  packed = jnp.asarray(attention_benchmark.packed_segment_ids(batch, length))
  platform = jax.default_backend()
  rows = []
  for name in attention_lib.IMPLEMENTATIONS[2:]:  # all but auto and reference
    dtype = jnp.float32 if name != 'cudnn' else jnp.bfloat16
    segments = None if name == 'cudnn' else packed
    if attention_lib.unsupported(name, platform=platform, length=length, head_dim=head_dim,
                                 dtype=dtype, segments=segments is not None):
      continue
    inputs = [x.astype(dtype) for x in (q, k, v)]

    def loss(implementation, q, k, v):
      out = attention_lib.attention(q, k, v, segments, segments, implementation=implementation)
      return jnp.sum(out.astype(jnp.float32) * cotangent)

    outputs = {
        impl: jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2)))
              (*inputs) for impl in ('reference', name)
    }
    tolerance = 1e-3 if dtype == jnp.float32 else 3e-2
    errors = [
        relative_error(got, want) for got, want in zip(jax.tree.leaves(outputs[name][1]),
                                                       jax.tree.leaves(outputs['reference'][1]))
    ]
    value_error = relative_error(outputs[name][0], outputs['reference'][0])
    worst = max([value_error] + errors)
    rows.append([
        f'attention {name} vs reference ({jnp.dtype(dtype).name}, '
        f'{"packed rows" if segments is not None else "one document per row"}, '
        f'{heads}/{kv_heads} heads)',
        f'forward {value_error:.1e}, gradients q/k/v ' + '/'.join(f'{e:.1e}' for e in errors),
        f'{worst:.1e} (tolerance {tolerance:g})', 'pass' if worst <= tolerance else 'FAIL'
    ])
  return rows


def check_generation(plan: Plan) -> list:
  """Greedy KV-cache generation against argmax over full forward passes, prompt by prompt."""
  config = load_config(plan, **{'model.dtype': 'float32'})
  model_config = dataclasses.replace(model_lib.ModelConfig.from_config(config.model),
                                     attention='reference')
  model = model_lib.Transformer(model_config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, model_config.vocab_size, size).tolist() for size in (5, 11)]
  new_tokens = 12
  cached = generate.generate(model, prompts, generate.Sampling(new_tokens), stop_ids=[-1])
  # One shape for every pass: the tokens so far, zero-padded on the right to `width`; the
  # causal mask keeps the padding out of the logits at `last`.
  width = max(map(len, prompts)) + new_tokens
  forward = jax.jit(lambda tokens, last: model(tokens)[0][0, last])
  loop = []
  for prompt in prompts:
    tokens = list(prompt)
    for _ in range(new_tokens):
      padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
      tokens.append(int(jnp.argmax(forward(padded, len(tokens) - 1))))
    loop.append(tokens[len(prompt):])
  same = cached == loop
  return [[
      'KV-cache greedy generation vs full forward passes (2 prompts, 12 tokens)',
      f'{sum(a == b for c, w in zip(cached, loop) for a, b in zip(c, w))} of '
      f'{2 * new_tokens} tokens equal', 'exact', 'pass' if same else 'FAIL'
  ]]


def correctness_section(plan: Plan) -> str:
  with jax.default_matmul_precision('highest'):  # float32 products, not TF32
    rows = check_train_step(plan) + check_attention(plan) + check_generation(plan)
  return table(['check', 'values', 'max relative error', 'result'], rows)


def speed_section(plan: Plan, steps: int) -> str:
  """Each remat policy with `auto` attention, then each other attention kernel."""
  device, platform = jax.devices()[0], jax.default_backend()
  config = load_config(plan)
  model_config = model_lib.ModelConfig.from_config(config.model)
  chosen = attention_lib.resolve_implementation('auto', platform, length=config.train.seq_len,
                                                head_dim=model_config.head_dim,
                                                dtype=model_config.compute_dtype,
                                                segments=config.data.segment_mask)
  runs = [{'model.remat': remat} for remat in plan.remats]
  runs += [{
      'model.attention': name,
      'data.segment_mask': name != 'cudnn'
  } for name in attention_lib.AUTO.get(platform, ()) if name != chosen]
  rows = []
  for overrides in runs:
    config = load_config(plan, **overrides)
    try:
      result = train_step_benchmark.measure(config, [device], steps)
    except Exception as error:  # out of memory, a kernel refusing the shape: say so, go on
      rows.append([
          overrides.get('model.attention', chosen),
          overrides.get('model.remat', config.model.remat), config.data.segment_mask,
          f'failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}', '', '', '', ''
      ])
      continue
    model_config = result['built'].model_config
    rows.append([
        model_config.attention, model_config.remat, config.data.segment_mask,
        f'{result["tokens_per_s"]:,.0f}', f'{result["tflops_per_device"]:.1f}',
        f'{result["mfu"]:.1%}' if result['mfu'] else 'n/a',
        f'{result["compiled_gib"]:.1f} GiB compiled' +
        (f', {result["peak_gib"]:.1f} GiB peak' if result['peak_gib'] else ''),
        f'{result["compile_s"]:.0f} s'
    ])
  return (
      f'{plan.speed_config}: batch {config.train.batch_size} x {config.train.seq_len}, '
      f'{config.model.dtype}, {steps} timed steps per row, one device\n\n' + table(
          ['attention', 'remat', 'segment mask', 'tokens/s', 'TFLOP/s', 'MFU', 'memory', 'compile'],
          rows))


def capacity_config(plan: Plan, dim: int, heads: int, layers: int, mode: str = 'float32'):
  config = load_config(plan, **{'model.remat': 'full', 'train.microbatches': 1})
  config.model.update(dim=dim, n_heads=heads, n_layers=layers, vocab_size=plan.capacity_vocab,
                      max_seq_len=plan.capacity_seq, multiple_of=256 if dim >= 1024 else 32)
  config.train.update(batch_size=1, seq_len=plan.capacity_seq, loss_chunks=8)
  return memory_modes.apply(config, mode)


def capacity_section(plan: Plan, device, limit) -> str:
  """For each memory mode: paper shapes until one does not fit, then the most layers of
  that width that fit."""
  rows = []
  for mode in plan.capacity_modes:
    try:
      rows += capacity_rows(plan, device, limit, mode)
    except ConfigError as error:  # host memory that compile-only GPU devices lack
      rows.append(['—', mode, '—', '—', f'not compiled: {error}'])
  return (f'train step, batch 1 x {plan.capacity_seq}, remat full, vocab {plan.capacity_vocab}, '
          f'each memory mode of docs/memory.md; limit {limit / GIB:.2f} GiB per device (XLA '
          'memory analysis of the compiled step; host memory not counted)\n\n' +
          table(['model', 'mode', 'parameters', 'memory', 'result'], rows))


def capacity_rows(plan: Plan, device, limit, mode: str) -> list:
  rows, measured = [], {}

  def need(dim, heads, layers):  # (bytes, parameters) of the compiled step
    if (dim, layers) not in measured:
      config = capacity_config(plan, dim, heads, layers, mode)
      compiled, built = aot.compile_train_step(config, [device])
      measured[dim, layers] = (aot.memory_per_chip(compiled)['total'], built.n_params)
    return measured[dim, layers]

  largest = None  # (dim, heads, layers)
  for name, dim, heads, layers in plan.capacity_shapes:
    memory, n_params = need(dim, heads, layers)
    fits = memory <= limit
    rows.append([
        f'{name} (dim {dim}, {layers} layers)', mode,
        count(n_params), f'{memory / GIB:.2f} GiB', 'fits' if fits else 'does not fit'
    ])
    if fits:
      largest = (dim, heads, layers)
      continue
    low, high = 1, layers - 1  # the most layers of this width that fit: binary search
    while low <= high:
      middle = (low + high) // 2
      if need(dim, heads, middle)[0] <= limit:
        largest, low = (dim, heads, middle), middle + 1
      else:
        high = middle - 1
    break
  if largest:
    memory, n_params = need(*largest)
    rows.append([
        f'largest that fits: dim {largest[0]}, {largest[2]} layers', mode,
        count(n_params), f'{memory / GIB:.2f} GiB', 'fits'
    ])
  return rows


def size(n_bytes: int) -> str:
  return f'{n_bytes / GIB:.2f} GiB' if n_bytes >= GIB / 10 else f'{n_bytes / 2**20:.1f} MiB'


def memory_section(plan: Plan, device, limit) -> str:
  """The speed section's train step for each remat policy, compiled: XLA's memory analysis."""
  rows = []
  for remat in plan.remats:
    config = load_config(plan, **{'model.remat': remat})
    start = time.perf_counter()
    compiled, built = aot.compile_train_step(config, [device])
    memory = aot.memory_per_chip(compiled)
    rows.append([
        remat, built.model_config.attention,
        size(memory['arguments']),
        size(memory['temporaries']),
        size(memory['total']), 'fits' if memory['total'] <= limit else 'does not fit',
        f'{time.perf_counter() - start:.0f} s'
    ])
  return (
      f'{plan.speed_config}: batch {config.train.batch_size} x {config.train.seq_len}, '
      f'{config.model.dtype}, one device, limit {size(limit)} (XLA memory analysis of the '
      'compiled step)\n\n' +
      table(['remat', 'attention', 'arguments', 'temporaries', 'total', 'result', 'compile'], rows))


def kernels_section(plan: Plan, device) -> str:
  """Each attention implementation of the device's platform, forward and backward at the
  correctness section's shape (packed rows but for cudnn), compiled for `device`: the
  custom calls its program holds (a Pallas kernel is one per pass)."""
  batch, length, heads, kv_heads, head_dim = plan.attention_shape
  platform, config = device.platform, load_config(plan)
  sharding = jax.sharding.SingleDeviceSharding(device)
  mesh = sharding_lib.make_mesh(config.mesh, [device])
  rows = []
  for name in attention_lib.AUTO.get(platform, ()):
    dtype = jnp.float32 if name != 'cudnn' else jnp.bfloat16
    packed = name != 'cudnn'
    reason = attention_lib.unsupported(name, platform=platform, length=length, head_dim=head_dim,
                                       dtype=dtype, segments=packed)
    if reason:
      rows.append([name, jnp.dtype(dtype).name, f'not compiled: {reason}', '', ''])
      continue

    def loss(q, k, v, segments, name=name):
      out = attention_lib.attention(q, k, v, segments, segments, implementation=name)
      return jnp.sum(out.astype(jnp.float32))

    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype, sharding=sharding)
    segments = (jax.ShapeDtypeStruct(
        (batch, length), jnp.int32, sharding=sharding) if packed else None)
    start = time.perf_counter()
    try:
      with sharding_lib.activation_sharding(mesh, config.mesh.rules):  # traced for `platform`
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments).compile()
    except Exception as error:  # a kernel the compiler refuses (shared memory): say so, go on
      rows.append(
          [name, jnp.dtype(dtype).name, f'FAILED: {str(error).splitlines()[0][:160]}', '', ''])
      continue
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    rows.append([
        name,
        jnp.dtype(dtype).name, ', '.join(f'{target} x{n}' for target, n in calls.items()) or
        'none (XLA ops)',
        size(aot.memory_per_chip(compiled)['temporaries']), f'{time.perf_counter() - start:.0f} s'
    ])
  return (f'causal attention, batch {batch} x {length}, {heads}/{kv_heads} heads of {head_dim}, '
          'forward and backward, one device\n\n' +
          table(['attention', 'dtype', 'custom calls compiled', 'temporaries', 'compile'], rows))


def decoding_section(plan: Plan) -> str:
  rows = []
  for name, dim, heads, layers in plan.decode_shapes:
    model_config = model_lib.ModelConfig(dim=dim, n_heads=heads, n_layers=layers,
                                         vocab_size=32000 if dim >= 1024 else 512,
                                         max_seq_len=plan.decode_prompt + plan.decode_new_tokens,
                                         attention='reference')
    graphdef = nnx.split(model_lib.abstract_model(model_config), nnx.Param)[0]

    @jax.jit
    def bfloat16_params():
      model = model_lib.Transformer(model_config, rngs=nnx.Rngs(0))
      return jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(model, nnx.Param))

    model = nnx.merge(graphdef, bfloat16_params())
    n_params = model_lib.count_params(model)
    sampling = generate.Sampling(plan.decode_new_tokens)
    for batch in plan.decode_batches:
      prompts = [[1] * plan.decode_prompt] * batch
      generate.generate(model, prompts, sampling, stop_ids=[-1])  # compile
      start = time.perf_counter()
      generate.generate(model, prompts, sampling, stop_ids=[-1])  # no EOS: every token decoded
      seconds = time.perf_counter() - start
      rows.append([
          f'{name} ({count(n_params)} parameters, bfloat16)', batch,
          f'{plan.decode_prompt} + {plan.decode_new_tokens}',
          f'{batch * plan.decode_new_tokens / seconds:,.0f}',
          f'{seconds / plan.decode_new_tokens * 1e3:.1f}'
      ])
    del model
  return table(['model', 'batch', 'prompt + new tokens', 'tokens/s', 'ms per step (with prefill)'],
               rows)


def choose_devices_and_sections():
  """(devices, memory limit per device, section names) from the flags."""
  unknown = set(FLAGS.sections or ()) - set(RUN_SECTIONS + COMPILE_ONLY_SECTIONS)
  if unknown:
    raise UserError(f'unknown --sections {", ".join(sorted(unknown))}; the sections are '
                    f'{", ".join(dict.fromkeys(RUN_SECTIONS + COMPILE_ONLY_SECTIONS))}.')
  if not FLAGS.compile_only:
    if FLAGS.topology:
      raise UserError('--topology is for --compile_only; without it the report runs on the '
                      'devices at hand.')
    names = FLAGS.sections or RUN_SECTIONS
    return jax.devices(), device_memory_limit(jax.devices()[0]), names
  if not FLAGS.topology:
    raise UserError('--compile_only needs --topology, e.g. --topology=h100-8 or v5p-8.')
  names = FLAGS.sections or COMPILE_ONLY_SECTIONS
  needs_devices = [name for name in names if name not in COMPILE_ONLY_SECTIONS]
  if needs_devices:
    raise UserError(f'--compile_only runs {", ".join(COMPILE_ONLY_SECTIONS)}; '
                    f'{", ".join(needs_devices)} need the devices themselves.')
  if 'JAX_PLATFORMS' not in os.environ:  # compile-only: see llama_jax.aot.main
    jax.config.update('jax_platforms', 'cpu')
  chip, devices = aot.topology_devices(FLAGS.topology)
  return devices, chip.hbm_bytes, names


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  plan = SMOKE if FLAGS.smoke else FULL
  try:
    devices, limit, names = choose_devices_and_sections()
  except UserError as error:
    sys.exit(f'error: {error}')
  sections = {
      'setup': lambda: setup_section(devices, limit, FLAGS.compile_only),
      'correctness': lambda: correctness_section(plan),
      'speed': lambda: speed_section(plan, 2 if FLAGS.smoke else FLAGS.steps),
      'capacity': lambda: capacity_section(plan, devices[0], limit),
      'memory': lambda: memory_section(plan, devices[0], limit),
      'kernels': lambda: kernels_section(plan, devices[0]),
      'decoding': lambda: decoding_section(plan)
  }
  report = [
      f'# Accelerator report: {devices[0].device_kind}' +
      (f' ({FLAGS.topology}, compile-only)' if FLAGS.compile_only else '') +
      (' (smoke: CPU-sized shapes)' if FLAGS.smoke else '')
  ]
  for name in names:
    start = time.perf_counter()
    body = sections[name]()
    report.append(f'## {name.capitalize()} ({time.perf_counter() - start:.0f} s)\n\n{body}')
    print(report[-1] + '\n', flush=True)
  with open(FLAGS.output, 'w') as f:
    f.write('\n\n'.join(report) + '\n')
  print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  flags.DEFINE_string('output', 'accelerator_report.md', 'Where the Markdown report goes.')
  flags.DEFINE_bool('smoke', False, 'CPU-sized shapes: checks that the script works.')
  flags.DEFINE_list(
      'sections', None, 'Sections to run (default: all; with --compile_only all '
      'that need no execution).')
  flags.DEFINE_bool('compile_only', False, 'Compile for --topology instead of running.')
  flags.DEFINE_string('topology', None,
                      'With --compile_only: a TPU or GPU topology (llama_jax.aot).')
  flags.DEFINE_integer('steps', 10, 'Timed train steps per speed row.')
  app.run(main)
