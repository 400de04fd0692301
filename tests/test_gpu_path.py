"""The GPU path, compiled for H100 machines on a CPU host (the CUDA compiler, no GPU).

As tests/test_pod_path.py does for TPU slices: the real train step compiled for GPU
topologies, read from what one GPU holds and sends. Needs `pip install -e '.[gpu-aot]'`.
"""

import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip('jax_plugins.xla_cuda13', reason="needs pip install -e '.[gpu-aot]'")

from test_pod_path import MESHES, llama_shaped  # noqa: E402

from benchmarks import accelerator_report  # noqa: E402
from llama_jax import aot, hlo  # noqa: E402
from llama_jax.errors import UserError  # noqa: E402

GIB, MIB = 2**30, 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for(topology, config):
  _, devices = aot.topology_devices(topology)
  return aot.compile_train_step(config, devices)


# Rows per fsdp shard that give the same per-GPU batch on 16 and 64 GPUs for each mesh, and a
# global batch of 128 x 2048 on 64 (fsdp 64, or fsdp 16 x sequence 2 x tensor 2).
ROWS = {'fsdp': 2, 'fsdp_sequence_tensor': 8}
BATCH, SEQ_LEN, DIM = 128, 2048, 1024


@functools.cache
def llama_shaped_step(gpus, mesh):
  """(compiled, Experiment) of a one-layer LLaMA (the real vocabulary, dim 1024, sequence
  2048) on `gpus` H100s, the batch growing with the GPU count; shared by the tests below."""
  return compile_for(
      f'h100-{gpus}',
      llama_shaped(gpus, rows_per_fsdp_shard=ROWS[mesh], dim=DIM, seq_len=SEQ_LEN, n_layers=1,
                   **MESHES[mesh]))


@functools.cache
def small_on_one_h100():
  """(compiled, Experiment, H100) of small.py at batch 1 x 2048 on one H100."""
  config = importlib.import_module('configs.small').get_config()
  config.train.batch_size = 1
  chip, devices = aot.topology_devices('h100-1')
  return (*aot.compile_train_step(config, devices), chip)


@pytest.mark.slow
def test_triton_attention_is_a_triton_kernel_for_sm90():
  """The Pallas GPU kernel (head_dim 128), forward and backward, lowered by Triton for
  sm_90a: a kernel that needed more shared memory than the H100's 227 KiB per block would
  not compile."""
  compiled, built = llama_shaped_step(16, 'fsdp')
  assert built.model_config.attention == 'triton'  # what `auto` takes for packed rows
  kernels = compiled.as_text().count('custom_call_target="__gpu$xla.gpu.triton"')
  assert kernels >= 3, kernels  # the forward (also recomputed by remat), dq and dk/dv


@pytest.mark.slow
@pytest.mark.parametrize('packed', [False, True])
def test_triton_kernels_see_only_a_gpu_s_own_chunks_under_sequence(packed):
  """8 H100s, sequence 8, 4096 tokens: every Triton kernel of the step (forward, dq,
  dk/dv) takes a GPU's two chunks of 256 tokens or one, queries and keys alike; gathered
  queries (the whole sequence attended on every GPU) would give it 4096. With packed
  documents only the GPU's own chunks (512 tokens) run in the kernel, the rest blockwise."""
  config = llama_shaped(8, 1, dim=256, seq_len=4096, n_layers=1, sequence=8)
  config.model.attention, config.data.segment_mask = 'triton', packed
  compiled, _ = compile_for('h100-8', config)
  kernels = [
      line for line in compiled.as_text().splitlines()
      if 'custom_call_target="__gpu$xla.gpu.triton"' in line
  ]
  lengths = {int(length) for line in kernels for length in re.findall(r'\[1,(\d+),4,64\]', line)}
  assert len(kernels) >= 3 and lengths == ({512} if packed else {256, 512}), (len(kernels), lengths)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_weak_scaling_keeps_the_memory_per_gpu(mesh):
  """4x the GPUs (16 to 64) and 4x the global batch: each GPU's temporaries stay within
  15%, and neither the largest array on a GPU nor the bytes it all-gathers grow
  (test_pod_path's test of the same name says why)."""
  small, big = (llama_shaped_step(gpus, mesh)[0] for gpus in (16, 64))
  small_temp = aot.memory_per_chip(small)['temporaries']
  big_temp = aot.memory_per_chip(big)['temporaries']
  assert abs(big_temp / small_temp - 1) < 0.15, (small_temp / MIB, big_temp / MIB)
  small_largest = hlo.largest_arrays(small.as_text(), 1)[0]
  big_largest = hlo.largest_arrays(big.as_text(), 1)[0]
  assert big_largest[0] <= small_largest[0], (small_largest, big_largest)
  small_gathered = hlo.collectives(small.as_text())['all-gather'][1]
  big_gathered = hlo.collectives(big.as_text())['all-gather'][1]
  assert big_gathered < 1.1 * small_gathered, (small_gathered / MIB, big_gathered / MIB)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_no_array_on_a_gpu_holds_a_global_activation(mesh):
  """On 64 GPUs no array in one GPU's program reaches half of the global [batch, length,
  embed] activation (bfloat16: 512 MiB here)."""
  compiled, _ = llama_shaped_step(64, mesh)
  largest = hlo.largest_arrays(compiled.as_text(), 3)
  assert largest[0][0] < BATCH * SEQ_LEN * DIM * 2 / 2, largest


@pytest.mark.slow
def test_the_update_is_in_place_on_a_gpu():
  """small.py at batch 1 x 2048 on one H100: the step's temporaries are about the float32
  gradients (the parameters' bytes) plus remat's few activations, not extra copies of the
  parameters. (A lax.cond between the updated and the old state gave 4.0x here: XLA's GPU
  compiler then keeps three more float32 copies of the parameters.)"""
  compiled, built, chip = small_on_one_h100()
  memory = aot.memory_per_chip(compiled)
  parameter_bytes = 4 * built.n_params
  assert memory['temporaries'] < 1.25 * parameter_bytes, memory['temporaries'] / parameter_bytes
  assert memory['total'] < chip.hbm_bytes


@pytest.mark.slow
def test_the_compile_only_accelerator_report_reads_the_memory_of_the_step():
  """benchmarks.accelerator_report --compile_only: its memory section compiles the step it
  names for the GPU (`auto` attention there is triton, not the CPU's reference) and reports
  what XLA's memory analysis of that step says (here small.py at batch 1, remat full)."""
  compiled, _, chip = small_on_one_h100()
  plan = dataclasses.replace(accelerator_report.FULL, speed_overrides={'batch_size': 1},
                             remats=('full',))
  section = accelerator_report.memory_section(plan,
                                              aot.topology_devices('h100-1')[1][0], chip.hbm_bytes)
  total = accelerator_report.size(aot.memory_per_chip(compiled)['total'])
  assert re.search(rf'^\| full \| triton \| .* \| {total} \| fits \|', section, re.M), section


@pytest.mark.slow
def test_the_compile_only_report_compiles_triton_in_float32_for_h100():
  """The kernels section at the correctness check's shape (head_dim 128, float32): Triton
  lowers the kernel forward and backward within the H100's shared memory (float32 tiles
  of 128 queries asked for 262,656 bytes of its 232,448 before the kernel took 64)."""
  device = aot.topology_devices('h100-1')[1][0]
  section = accelerator_report.kernels_section(accelerator_report.FULL, device)
  assert re.search(r'^\| triton \| float32 \| __gpu\$xla\.gpu\.triton x3 \|', section,
                   re.M), section


def test_gpu_topology_names():
  assert aot.parse_gpu_topology('h100-1')[1:] == (1, '1x1x1')
  assert aot.parse_gpu_topology('h200-8')[1:] == (8, '1x1x8')
  assert aot.parse_gpu_topology('a100-40g-64')[1:] == (64, '1x8x8')
  with pytest.raises(UserError, match='multiple of 8'):
    aot.parse_gpu_topology('h100-12')
  memory_gib = {'h100': 79, 'h200': 141, 'a100': 79, 'a100-40g': 39, 'b200': 178}
  for name in aot.GPUS:
    gpu, devices = aot.topology_devices(f'{name}-16')
    assert len(devices) == 16 and int(gpu.hbm_bytes / GIB) == memory_gib[name]


def test_cudnn_attention_without_cudnn_is_one_sentence():
  if importlib.util.find_spec('nvidia.cudnn') is not None:
    pytest.skip('cuDNN is installed')
  config = importlib.import_module('configs.tiny').get_config()
  config.model.update(attention='cudnn', dtype='bfloat16')
  config.data.segment_mask = False
  with pytest.raises(UserError, match='cuDNN'):
    compile_for('h100-1', config)


@pytest.mark.slow
def test_llama_7b_at_the_paper_batch_fits_64_h100s_by_the_aot_command():
  """docs/gpu.md's command and fit: 7B, 2048 x 2048 tokens in 8 microbatches, remat full,
  triton, fsdp 64; run without JAX_PLATFORMS set (the command sets it itself)."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  done = subprocess.run([
      sys.executable, '-m', 'llama_jax.aot', '--config=configs/llama_7b.py', '--topology=h100-64',
      '--config.train.microbatches=8'
  ], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'remat full, attention triton, batch 2048 x 2048 in 8 microbatch(es)' in done.stdout
  total = float(
      re.search(r'memory per GPU: .* total ([\d.]+) GiB of 79 GiB -> fits', done.stdout).group(1))
  assert total < 0.15 * 79, done.stdout  # docs/gpu.md: 5.70 of 79 GiB
  assert 'assuming 50% MFU of 989 TFLOP/s' in done.stdout
