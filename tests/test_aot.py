"""Ahead-of-time compilation of the real train step for TPU topologies (libtpu, no TPU)."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import aot
from llama_jax import sharding as sharding_lib
from llama_jax.errors import ConfigError, UserError

GIB = 2**30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**mesh):
  config = importlib.import_module('configs.tiny').get_config()
  config.mesh.update(mesh)
  return config


@pytest.mark.slow
def test_tiny_step_compiles_for_v5e_with_splash_attention_and_fits():
  chip, devices = aot.topology_devices('v5e-4')
  assert len(devices) == 4 and chip.hbm_bytes == 16 * GIB
  compiled, built = aot.compile_train_step(tiny(tensor=2), devices)
  assert built.model_config.attention == 'splash'
  assert 'tpu_custom_call' in compiled.as_text()  # the Pallas kernel, forward and backward
  memory = aot.memory_per_chip(compiled)
  # Parameters and two Adam moments, float32, split over 4 chips, are arguments.
  assert memory['arguments'] >= 3 * 4 * built.n_params / 4
  assert 0 < memory['total'] < chip.hbm_bytes


@pytest.mark.slow
def test_a_step_too_big_for_the_chip_exits_1():
  overrides = dict(dim=1024, n_layers=2, vocab_size=32000, max_seq_len=2048, remat='none')
  command = [
      sys.executable, '-m', 'llama_jax.aot', '--config=configs/tiny.py', '--topology=v5e-1',
      '--config.train.batch_size=32', '--config.train.seq_len=2048',
      *[f'--config.model.{k}={v}' for k, v in overrides.items()]
  ]
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1')  # this test process holds libtpu too
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert done.returncode == 1, done.stderr[-2000:]
  assert 'DOES NOT FIT' in done.stdout and 'train.microbatches' in done.stdout


def test_mesh_for_a_topology_uses_every_device_once():
  _, devices = aot.topology_devices('v5p-16')
  mesh = sharding_lib.make_mesh(tiny(data=2, fsdp=2, tensor=2).mesh, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)

  _, two_slices = aot.topology_devices('v5p-8', slices=2)
  mesh = sharding_lib.make_mesh(tiny(data=2, fsdp=-1).mesh, two_slices)
  for index in range(2):  # each data-parallel group lies within one slice
    assert len({d.slice_index for d in np.asarray(mesh.devices)[index].flat}) == 1
  with pytest.raises(ConfigError, match='multiple of the 2 slices'):
    sharding_lib.make_mesh(tiny(data=1, fsdp=-1).mesh, two_slices)


@pytest.mark.parametrize('name,chips,shape', [('v4-8', 4, 'v4:2x2x1'), ('v5p-128', 64, 'v5p:4x4x4'),
                                              ('v5e-16', 16, 'v5e:4x4'), ('v6e-1', 1, 'v6e:1x1'),
                                              ('v5litepod-256', 256, 'v5e:16x16')])
def test_cloud_tpu_names(name, chips, shape):
  assert aot.parse_topology(name)[1:] == (chips, shape)


def test_bad_topologies_and_meshes(monkeypatch):
  with pytest.raises(UserError, match='unknown topology'):
    aot.parse_topology('v9-8')
  with pytest.raises(UserError, match='not a slice size'):
    aot.parse_topology('v5p-12')
  _, devices = aot.topology_devices('v5e-4')
  with pytest.raises(ConfigError, match='do not divide the 4 devices'):
    aot.compile_train_step(tiny(fsdp=-1, tensor=3), devices)
  from jax.experimental import topologies

  def no_libtpu(**kwargs):
    raise RuntimeError('Unable to initialize backend tpu')

  monkeypatch.setattr(topologies, 'get_topology_desc', no_libtpu)
  with pytest.raises(UserError, match=r"pip install -e '.\[tpu\]'"):
    aot.topology_devices('v5e-4')

  def held_by_another_process(**kwargs):  # the message libtpu gives (seen on this machine)
    raise RuntimeError('TPU initialization failed: open(/tmp/libtpu_lockfile): Resource '
                       'temporarily unavailable; libtpu multi-process lockfile')

  monkeypatch.setattr(topologies, 'get_topology_desc', held_by_another_process)
  with pytest.raises(UserError, match='another process on this machine holds '
                     '/tmp/libtpu_lockfile') as error:
    aot.topology_devices('v5e-4')
  assert 'pip install' not in str(error.value)
