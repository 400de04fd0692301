"""A config built on a set of devices: checks, mesh, shardings and the jitted steps.

`build(config, devices)` checks everything a user can get wrong before anything is
compiled, then returns what train.py, eval.py, the AOT tool and the benchmarks all run:
the model config (its `auto` attention resolved for the devices), the mesh, the state's
shardings and the jitted train and eval steps. Nothing here touches data or disk.
"""

import dataclasses
from typing import Callable

import jax
import optax

from llama_jax import attention as attention_lib
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import sharding as sharding_lib
from llama_jax import steps
from llama_jax.data import mixture
from llama_jax.errors import ConfigError

MEMORIES = ('device', 'host')  # where optim.master_memory / optim.state_memory may keep arrays


def validate(config, mesh_sizes: dict, platform: str) -> model_lib.ModelConfig:
  """Checks the keys that must agree with each other; returns the model config.

  Its `auto` attention is resolved for `platform` (the devices the step compiles for).
  """
  model_config = model_lib.ModelConfig.from_config(config.model)
  train = config.train
  model_config = dataclasses.replace(
      model_config, attention=attention_lib.resolve_implementation(
          model_config.attention, platform, length=train.seq_len, head_dim=model_config.head_dim,
          dtype=model_config.compute_dtype, segments=config.data.segment_mask))

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  check(train.steps > 0, f'train.steps must be positive, got {train.steps}.')
  conversations = [s.name for s in mixture.sources_of(config.data) if s.format != 'text']
  check(
      config.data.segment_mask or not conversations,
      f'the conversation source {", ".join(conversations)} packs several conversations to a '
      'row, which needs data.segment_mask=True (else they attend to each other); set it (on '
      'a GPU with model.attention=auto or triton: cudnn cannot mask packed rows).')
  check(
      train.seq_len <= model_config.max_seq_len,
      f'train.seq_len ({train.seq_len}) exceeds model.max_seq_len '
      f'({model_config.max_seq_len}); lower the first or raise the second.')
  check(
      train.microbatches > 0 and train.batch_size % train.microbatches == 0,
      f'train.batch_size ({train.batch_size}) must be divisible by train.microbatches '
      f'({train.microbatches}).')
  data_parallel = mesh_sizes['data'] * mesh_sizes['fsdp']
  micro_batch = train.batch_size // train.microbatches
  check(
      micro_batch % data_parallel == 0,
      f'the batch per microbatch ({micro_batch} = train.batch_size / train.microbatches) '
      f'must be divisible by mesh.data x mesh.fsdp ({data_parallel}).')
  check(
      train.loss_chunks > 0 and train.seq_len % train.loss_chunks == 0,
      f'train.seq_len ({train.seq_len}) must be divisible by train.loss_chunks '
      f'({train.loss_chunks}).')
  chunks = 2 * mesh_sizes['sequence'] if mesh_sizes['sequence'] > 1 else 1
  check(
      train.seq_len % chunks == 0,
      f'train.seq_len ({train.seq_len}) must be divisible by 2 x mesh.sequence ({chunks}): '
      'each chip holds an early and a late chunk of every sequence.')
  check(
      train.eval_every > 0 or not train.eval_tasks,
      'train.eval_tasks run at each validation, and train.eval_every is 0; set it to how '
      'often to run them.')
  check(
      mesh_sizes['sequence'] == 1 or model_config.context_parallel == 'all_gather' or
      model_config.attention in ('reference', 'blockwise', 'triton'),
      f'model.context_parallel=ring passes partial softmax statistics between chips, which '
      f'model.attention={model_config.attention} cannot return; use model.attention=blockwise '
      'or model.context_parallel=all_gather.')
  optim_config = config.optim
  check(optim_config.state_dtype in optim.STATE_DTYPES,
        f'optim.state_dtype is {optim_config.state_dtype!r}; use float32 or bfloat16.')
  check(
      optim_config.state_dtype == 'float32' or optim_config.b2 <= optim.BFLOAT16_MAX_B2,
      f'optim.b2={optim_config.b2} moves the second moment by less than one bfloat16 spacing a '
      f'step, so optim.state_dtype=bfloat16 would round its updates away; use b2 <= '
      f'{optim.BFLOAT16_MAX_B2:.4f} or optim.state_dtype=float32.')
  check(train.param_dtype in optim.STATE_DTYPES,
        f'train.param_dtype is {train.param_dtype!r}; use float32 or bfloat16.')
  check(optim_config.master_memory in MEMORIES + ('none',),
        f'optim.master_memory is {optim_config.master_memory!r}; use device, host or none.')
  check(optim_config.state_memory in MEMORIES,
        f'optim.state_memory is {optim_config.state_memory!r}; use device or host.')
  check(
      train.param_dtype != 'float32' or optim_config.master_memory == 'device',
      f'optim.master_memory={optim_config.master_memory} places the float32 copy of bfloat16 '
      'weights, and train.param_dtype=float32 weights are their own master; set '
      'train.param_dtype=bfloat16 or leave optim.master_memory=device.')
  for key, heads in (('n_heads', model_config.n_heads), ('n_kv_heads', model_config.kv_heads)):
    check(heads % mesh_sizes['tensor'] == 0,
          f'model.{key} ({heads}) must be divisible by mesh.tensor ({mesh_sizes["tensor"]}).')
  return model_config


def storage_of(config) -> dict:
  """steps.init_state's storage options: the params' dtype and whether a master exists."""
  return dict(param_dtype=optim.STATE_DTYPES[config.train.param_dtype],
              master=config.optim.master_memory != 'none')


def place(shardings: steps.TrainState, optim_config) -> steps.TrainState:
  """The state's shardings with the master and optimizer state in host memory if asked."""
  def memory(tree, where, key):
    if where != 'host':
      return tree
    placed = jax.tree.map(lambda s: s.with_memory_kind('pinned_host'), tree)
    if any(s.memory_kind != 'pinned_host' for s in jax.tree.leaves(placed)):
      # jax drops a memory kind the devices lack: compile-only GPU devices in jax 0.10.2
      raise ConfigError(f'optim.{key}=host needs host memory (pinned_host) on the devices, '
                        'and these devices offer none; use optim.' + key + '=device.')
    return placed

  return shardings.replace(
      master=memory(shardings.master, optim_config.master_memory, 'master_memory'),
      opt_state=memory(shardings.opt_state, optim_config.state_memory, 'state_memory'))


@dataclasses.dataclass
class Experiment:
  """What a config builds on a set of devices before any data or state exists."""
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  optimizer: optax.GradientTransformation
  abstract_state: steps.TrainState  # shapes only
  shardings: steps.TrainState  # the NamedSharding of every state leaf
  params_shardings: object  # of all the model's parameters (trained and frozen): eval_step's
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted; (state, batch) -> (state, metrics)
  eval_step: Callable  # jitted; (all params, batch, token_bytes) -> (nll, weight, bytes) sums
  n_params: int
  storage: dict  # steps.init_state's param_dtype and master

  def create_state(self, seed) -> steps.TrainState:
    """A fresh state, initialized directly into its shardings."""
    return steps.create_sharded_state(seed, self.model_config, self.optimizer, self.shardings,
                                      **self.storage)


def build(config, devices) -> Experiment:
  """Validates `config` for `devices` and builds the mesh, shardings and jitted steps."""
  sizes = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config.mesh, len(devices))))
  model_config = validate(config, sizes, devices[0].platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  abstract = steps.abstract_state(model_config, optimizer, **storage_of(config))
  shardings = place(sharding_lib.state_shardings(abstract, mesh, rules), config.optim)
  graphdef = steps.graphdef_of(model_config)
  loss_options = dict(segment_mask=config.data.segment_mask, loss_chunks=config.train.loss_chunks)
  train_step = steps.jit_train_step(
      mesh, rules, shardings, graphdef=graphdef, optimizer=optimizer,
      learning_rate=optim.learning_rate_schedule(config.optim, config.train.steps),
      clip_norm=config.optim.clip_norm, microbatches=config.train.microbatches,
      z_loss=config.train.z_loss, **loss_options)
  params_shardings = steps.all_params(shardings)
  eval_step = steps.jit_eval_step(mesh, rules, params_shardings, graphdef=graphdef, **loss_options)
  return Experiment(model_config, mesh, rules, optimizer, abstract, shardings, params_shardings,
                    sharding_lib.batch_sharding(mesh, rules), train_step, eval_step,
                    model_lib.count_params(model_lib.abstract_model(model_config)),
                    storage_of(config))
