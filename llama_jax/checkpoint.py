"""Orbax checkpoints: parameters, optimizer state, data position and config, saved async.

Layout of `<workdir>/checkpoints/<step>/`:
  params       the float32 parameters (sharded array files; all that evaluation reads);
               a LoRA run's adapters only
  train_state  optimizer state, step and skipped-step counters, and the float32 master
               copy of bfloat16 parameters (train.param_dtype) when there is one
  data         the position of every row of the global batch, gathered from all
               processes, so a run resumes on any number of hosts
  config       the run's config as JSON, so evaluation knows the model's shape
  base         (LoRA runs) the base checkpoint the adapters apply to: directory and step
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama_jax.errors import UserError


def absolute(directory: str) -> str:
  """Orbax wants absolute paths: local ones are made absolute, gs:// ones kept."""
  return directory if '://' in directory else os.path.abspath(os.path.expanduser(directory))


def make_manager(directory: str, checkpoint_config=None) -> ocp.CheckpointManager:
  """A manager that saves by `checkpoint_config`, or (None) one that only reads.

  A reading manager works for this process alone, with no barrier that the others must
  reach: a process that cannot read a checkpoint leaves no one waiting.
  """
  directory = absolute(directory)
  me = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  options = ocp.CheckpointManagerOptions(create=False, multiprocessing_options=alone)
  if checkpoint_config is not None:
    options = ocp.CheckpointManagerOptions(max_to_keep=checkpoint_config.keep,
                                           keep_period=checkpoint_config.keep_period or None,
                                           enable_async_checkpointing=checkpoint_config.async_save,
                                           create=True)
  handlers = {
      'params': ocp.StandardCheckpointHandler(),
      'train_state': ocp.StandardCheckpointHandler(),
      'data': ocp.JsonCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
      'base': ocp.JsonCheckpointHandler()
  }
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


def _train_state_without_params(state) -> dict:
  return {
      'step': state.step,
      'opt_state': state.opt_state,
      'bad_steps': state.bad_steps,
      'skipped_steps': state.skipped_steps,
      'master': state.master
  }


def save(manager, step: int, state, first_row: int, row_states: list, config_dict: dict,
         base: dict | None = None):
  """Starts writing checkpoint `step` (in the background when async).

  row_states: this process's data positions, for the rows from `first_row` on; base: the
  base checkpoint of a LoRA run's adapters ({'directory', 'step'}), else None.
  """
  items = dict(params=ocp.args.StandardSave(state.params),
               train_state=ocp.args.StandardSave(_train_state_without_params(state)),
               data=ocp.args.JsonSave({'rows': _gather_rows(first_row, row_states)}),
               config=ocp.args.JsonSave(config_dict))
  if base is not None:
    items['base'] = ocp.args.JsonSave(base)
  manager.save(step, args=ocp.args.Composite(**items))


def save_params(directory: str, step: int, params, config_dict: dict) -> None:
  """A parameters-only checkpoint (converted weights) that eval.py and fine-tuning load."""
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(absolute(directory), options=options) as manager:
    manager.save(
        step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                      config=ocp.args.JsonSave(config_dict)))
    manager.wait_until_finished()


def _target(abstract, shardings):
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract, shardings)


def restore(directory: str, step: int, abstract_state, shardings):
  """Restores checkpoint `step` onto `shardings` (any mesh); returns (state, row states).

  Each process reads its own shards by itself (see make_manager).
  """
  with make_manager(directory) as manager:
    restored = manager.restore(
        step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_target(abstract_state.params, shardings.params)),
            train_state=ocp.args.StandardRestore(
                _target(_train_state_without_params(abstract_state),
                        _train_state_without_params(shardings))), data=ocp.args.JsonRestore()))
  state = abstract_state.replace(params=restored.params, **restored.train_state)
  return state, restored.data['rows']


def directory_of(workdir: str, directory: str = '') -> str:
  """The checkpoint folder of a run: `checkpoint.directory`, else WORKDIR/checkpoints."""
  return directory or os.path.join(workdir, 'checkpoints')


def find_step(directory: str, step: int | None = None) -> int:
  """The newest step in `directory`, or `step` if it exists; a clear error otherwise."""
  if not epath.Path(directory).is_dir():
    raise UserError(f'no checkpoints in {directory}; give the --workdir of a train.py run '
                    '(or a folder written by llama_jax.convert).')
  with make_manager(directory) as manager:
    steps = manager.all_steps()
  if not steps:
    raise UserError(f'no complete checkpoint in {directory}.')
  if step is None:
    return max(steps)
  if step not in steps:
    raise UserError(f'there is no checkpoint of step {step} in {directory}; it has steps '
                    f'{", ".join(map(str, sorted(steps)))}.')
  return step


def saved_config(directory: str, step: int) -> dict:
  with make_manager(directory) as manager:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def saved_param_names(directory: str, step: int) -> set[str]:
  """The top-level names in checkpoint `step`'s parameters (e.g. 'output' unless tied)."""
  with make_manager(directory) as manager:
    return set(manager.item_metadata(step)['params'].keys())


def saved_base(directory: str, step: int) -> dict:
  """The base checkpoint ({'directory', 'step'}) that a LoRA checkpoint's adapters apply to."""
  with make_manager(directory) as manager:
    return manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore())).base


def restore_params(directory: str, step: int, abstract_params, shardings):
  """Only the parameters of checkpoint `step`, onto `shardings`; nothing else is read."""
  with make_manager(directory) as manager:
    return manager.restore(
        step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_target(abstract_params, shardings)))).params
