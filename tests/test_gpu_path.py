"""The GPU path, compiled for H100 machines on a CPU host (the CUDA compiler, no GPU).

As tests/test_pod_path.py does for TPU slices: the real train step compiled for GPU
topologies, read from what one GPU holds and sends. Needs `pip install -e '.[gpu-aot]'`.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip('jax_plugins.xla_cuda13', reason="needs pip install -e '.[gpu-aot]'")

from test_pod_path import MESHES, llama_shaped  # noqa: E402

from llama_jax import aot, hlo  # noqa: E402
from llama_jax.errors import UserError  # noqa: E402

GIB, MIB = 2**30, 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for(topology, config):
  _, devices = aot.topology_devices(topology)
  return aot.compile_train_step(config, devices)


@pytest.mark.slow
def test_triton_attention_is_a_triton_kernel_for_sm90_on_h100_8():
  """The Pallas GPU kernel, forward and backward, lowered by Triton for sm_90a: a kernel
  that needed more shared memory than the H100's 227 KiB per block would not compile."""
  config = llama_shaped(8, rows_per_fsdp_shard=1, seq_len=1024)
  config.model.attention = 'triton'
  compiled, built = compile_for('h100-8', config)
  assert built.model_config.attention == 'triton'
  kernels = compiled.as_text().count('custom_call_target="__gpu$xla.gpu.triton"')
  assert kernels >= 3, kernels  # the forward (also recomputed by remat), dq and dk/dv


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_weak_scaling_keeps_the_memory_per_gpu(mesh):
  """4x the GPUs and 4x the global batch: each GPU's temporaries stay within 15%, and
  neither the largest array on a GPU nor the bytes it all-gathers grow (test_pod_path's
  test of the same name says why)."""
  small, big = (compile_for(f'h100-{gpus}', llama_shaped(gpus, rows_per_fsdp_shard=4,
                                                         **MESHES[mesh]))[0]
                for gpus in ((8, 32) if mesh == 'fsdp' else (16, 64)))
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
  batch, seq_len, dim = 128, 2048, 1024
  rows = 2 if mesh == 'fsdp' else 8  # fsdp 64 or 16
  compiled, _ = compile_for(
      'h100-64',
      llama_shaped(64, rows_per_fsdp_shard=rows, dim=dim, seq_len=seq_len, n_layers=1,
                   **MESHES[mesh]))
  largest = hlo.largest_arrays(compiled.as_text(), 3)
  assert largest[0][0] < batch * seq_len * dim * 2 / 2, largest


@pytest.mark.slow
def test_the_update_is_in_place_on_a_gpu():
  """small.py at batch 1 x 2048 on one H100: the step's temporaries are about the float32
  gradients (the parameters' bytes) plus remat's few activations, not extra copies of the
  parameters. (A lax.cond between the updated and the old state gave 4.0x here: XLA's GPU
  compiler then keeps three more float32 copies of the parameters.)"""
  config = importlib.import_module('configs.small').get_config()
  config.train.batch_size = 1
  chip, devices = aot.topology_devices('h100-1')
  compiled, built = aot.compile_train_step(config, devices)
  memory = aot.memory_per_chip(compiled)
  parameter_bytes = 4 * built.n_params
  assert memory['temporaries'] < 1.25 * parameter_bytes, memory['temporaries'] / parameter_bytes
  assert memory['total'] < chip.hbm_bytes


@pytest.mark.slow
def test_llama_7b_at_the_paper_batch_fits_64_h100s():
  """docs/gpu.md's fit: 7B, 2048 x 2048 tokens in 8 microbatches, remat full, fsdp 64."""
  config = importlib.import_module('configs.llama_7b').get_config()
  config.train.microbatches = 8
  chip, devices = aot.topology_devices('h100-64')
  compiled, built = aot.compile_train_step(config, devices)
  assert built.model_config.remat == 'full' and built.model_config.attention == 'triton'
  total = aot.memory_per_chip(compiled)['total']
  assert total < 0.15 * chip.hbm_bytes, total / GIB  # docs/gpu.md: 5.70 of 79 GiB


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
def test_the_aot_command_reports_a_gpu_fit_without_jax_platforms_set():
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  done = subprocess.run([
      sys.executable, '-m', 'llama_jax.aot', '--config=configs/tiny.py', '--topology=h100-8',
      '--config.train.batch_size=8'
  ], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'memory per GPU' in done.stdout and '-> fits' in done.stdout
  assert 'assuming 50% MFU of 989 TFLOP/s' in done.stdout
