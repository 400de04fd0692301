"""Orbax checkpoints: train state, data iterator position and config, saved asynchronously.

Layout of a workdir's `checkpoints/<step>/`: `state` (parameters, optimizer state, step;
sharded array files), `data` (the position of every row of the global batch, gathered
from all processes, so a run can resume on any number of hosts) and `config` (the run's
config as JSON, so evaluation knows the model's shape).
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def make_manager(directory: str, checkpoint_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep,
      keep_period=checkpoint_config.keep_period or None,
      enable_async_checkpointing=checkpoint_config.async_save,
      create=True)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'data': ocp.JsonCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _gather_rows(first_row: int, states: list) -> list:
  """Every process's row states, in global row order (a collective on several processes)."""
  local = json.dumps([first_row, states]).encode()
  if jax.process_count() == 1:
    pieces = [local]
  else:
    size = int(np.max(multihost_utils.process_allgather(np.array([len(local)]))))
    padded = np.frombuffer(local.ljust(size, b' '), np.uint8)
    pieces = [bytes(row) for row in multihost_utils.process_allgather(padded)]
  ordered = sorted(json.loads(piece) for piece in pieces)
  return [state for _, row_states in ordered for state in row_states]


def save(manager, step: int, state, first_row: int, row_states: list, config_dict: dict):
  """Starts writing checkpoint `step` (in the background when async).

  row_states: this process's data positions, for the rows from `first_row` on.
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({'rows': _gather_rows(first_row, row_states)}),
      config=ocp.args.JsonSave(config_dict)))


def saved_config(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore(manager, step: int, abstract_state, shardings):
  """Restores checkpoint `step` onto `shardings` (any mesh); returns (state, row states)."""
  target = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored.state, restored.data['rows']
