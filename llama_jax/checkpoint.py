"""Orbax checkpoints: train state, data iterator position and config, saved asynchronously.

Layout of a workdir's `checkpoints/<step>/`: `state` (parameters, optimizer state, step;
sharded array files), `data` (each process's grain iterator state) and `config` (the
run's config as JSON, so evaluation knows the model's shape).
"""

import grain
import jax
import orbax.checkpoint as ocp


def make_manager(directory: str, checkpoint_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep,
      keep_period=checkpoint_config.keep_period or None,
      enable_async_checkpointing=checkpoint_config.async_save,
      create=True)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager, step: int, state, data_iterator, config_dict: dict) -> None:
  """Starts writing checkpoint `step` (in the background when async)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config_dict)))


def saved_config(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore(manager, step: int, abstract_state, shardings, data_iterator):
  """Restores checkpoint `step` onto `shardings` (any mesh) and rewinds `data_iterator`."""
  target = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored.state
