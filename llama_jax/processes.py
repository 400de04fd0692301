"""Several processes (TPU pod hosts, SLURM tasks) as one run: joining, speaking, meeting."""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int):
  """Joins the other processes: explicit address (CPU tests), else a detected cluster."""
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used only by CPUs
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or ',' in os.environ.get(
      'TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()  # TPU pod slices and SLURM: everything from the environment


def say(message: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def sync(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_true(value: bool) -> bool:
  """Whether `value` is true on every process (each process must call this)."""
  if jax.process_count() == 1:
    return value
  return bool(np.min(multihost_utils.process_allgather(np.array([value], np.int32))))
