"""The training loop: config + workdir -> a sharded, resumable run with metrics and checkpoints.

Set-up checks everything a user can get wrong before anything is compiled; the loop
then feeds each host's rows of the global batch to the jitted step, logs every
`logging.every_steps` (the only host/device synchronization), evaluates, and saves
checkpoints asynchronously. Restarting with the same workdir resumes exactly.
"""

import dataclasses
import os
import time
from typing import Callable

import jax
import optax
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from llama_jax import attention as attention_lib
from llama_jax import checkpoint as checkpoint_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import preemption
from llama_jax import sharding as sharding_lib
from llama_jax import train_lib
from llama_jax.data import pipeline, sources
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import ConfigError, UserError

# Model keys that fix the shapes of the parameters (a checkpoint must agree on them).
SHAPE_KEYS = ('dim', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size', 'multiple_of',
              'ffn_dim_multiplier')


def validate(config, mesh_sizes: dict, platform: str) -> model_lib.ModelConfig:
  """Checks the keys that must agree with each other; returns the model config.

  Its `auto` attention is resolved for `platform` (the devices the step compiles for).
  """
  model_config = model_lib.ModelConfig.from_config(config.model)
  train = config.train
  model_config = dataclasses.replace(model_config, attention=attention_lib.resolve_implementation(
      model_config.attention, platform, length=train.seq_len, head_dim=model_config.head_dim,
      dtype=model_config.compute_dtype, segments=config.data.segment_mask))

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  check(train.steps > 0, f'train.steps must be positive, got {train.steps}.')
  check(train.seq_len <= model_config.max_seq_len,
        f'train.seq_len ({train.seq_len}) exceeds model.max_seq_len '
        f'({model_config.max_seq_len}); lower the first or raise the second.')
  check(train.microbatches > 0 and train.batch_size % train.microbatches == 0,
        f'train.batch_size ({train.batch_size}) must be divisible by train.microbatches '
        f'({train.microbatches}).')
  data_parallel = mesh_sizes['data'] * mesh_sizes['fsdp']
  micro_batch = train.batch_size // train.microbatches
  check(micro_batch % data_parallel == 0,
        f'the batch per microbatch ({micro_batch} = train.batch_size / train.microbatches) '
        f'must be divisible by mesh.data x mesh.fsdp ({data_parallel}).')
  check(train.loss_chunks > 0 and train.seq_len % train.loss_chunks == 0,
        f'train.seq_len ({train.seq_len}) must be divisible by train.loss_chunks '
        f'({train.loss_chunks}).')
  check(train.seq_len % mesh_sizes['sequence'] == 0,
        f'train.seq_len ({train.seq_len}) must be divisible by mesh.sequence '
        f'({mesh_sizes["sequence"]}).')
  for key, heads in (('n_heads', model_config.n_heads), ('n_kv_heads', model_config.kv_heads)):
    check(heads % mesh_sizes['tensor'] == 0,
          f'model.{key} ({heads}) must be divisible by mesh.tensor ({mesh_sizes["tensor"]}).')
  return model_config


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int):
  """Joins the other processes: explicit address (CPU tests), else a detected cluster."""
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used only by CPUs
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or ',' in os.environ.get(
      'TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()  # TPU pod slices and SLURM: everything from the environment


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def prepare_data(data_config, vocab_size: int):
  """The train/eval sources and the tokenizer; process 0 prepares, the others wait."""
  if jax.process_index() == 0:
    sources.prepare(sources.dataset_builder(data_config.name, data_config.data_dir,
                                            data_config.text_dir))
  _sync('dataset prepared')
  builder = sources.dataset_builder(data_config.name, data_config.data_dir,
                                    data_config.text_dir)
  sources.prepare(builder)  # a no-op now, or a clear error for an unprepared catalog set
  train_source = sources.open_split(builder, data_config.train_split, data_config.text_feature)
  eval_source = sources.open_split(builder, data_config.eval_split, data_config.text_feature)
  path = data_config.tokenizer
  if not path:
    name = f'{builder.name}_{builder.builder_config.name}' if builder.builder_config else builder.name
    path = os.path.join(os.path.expanduser(data_config.data_dir), 'tokenizers',
                        f'{name.replace("/", "_")}_{vocab_size}.model')
    if jax.process_index() == 0 and not epath.Path(path).exists():
      _say(f'Training a {vocab_size}-token tokenizer on {builder.name} into {path}')
      feature = data_config.text_feature
      tokenizer_lib.train((train_source[i][feature].decode('utf-8', errors='replace')
                           for i in range(len(train_source))), vocab_size, path)
    _sync('tokenizer trained')
  tokenizer = tokenizer_lib.load(path)
  tokenizer_lib.check_vocab(tokenizer, vocab_size, path)
  return train_source, eval_source, tokenizer


def host_batches(config, source, tokenizer, rows: range, shuffle: bool):
  """This process's rows of the global batches of `source` (a grain dataset)."""
  return pipeline.batches(source, text_feature=config.data.text_feature, tokenizer=tokenizer,
                          batch_size=config.train.batch_size, rows=rows,
                          seq_len=config.train.seq_len, seed=config.train.seed,
                          shuffle=shuffle, prefetch=config.data.prefetch)


def global_batches(host_iterator, batch_sharding, batch_size: int, rows: range):
  """Global jax.Array batches assembled from every process's rows."""
  for host_batch in host_iterator:
    yield sharding_lib.global_batch(host_batch, batch_sharding, batch_size, rows)


def _check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as error:
    raise UserError(f'cannot write to the workdir {workdir} ({error.strerror or error}); '
                    'choose a writable --workdir.') from None


def _check_checkpoint_matches(directory: str, step: int, model_config, workdir: str) -> None:
  saved = checkpoint_lib.saved_config(directory, step)['model']
  current = dataclasses.asdict(model_config)
  different = [f'{k} {saved.get(k)} vs {current[k]}' for k in SHAPE_KEYS
               if saved.get(k) != current[k]]
  if different:
    raise UserError(f'{workdir} holds a checkpoint of a different model '
                    f'({", ".join(different)}, saved vs now); use another --workdir or the '
                    'saved model config.')


def _report_partial_checkpoints(checkpoint_dir: str) -> None:
  directory = epath.Path(checkpoint_dir)
  if directory.is_dir():
    for path in sorted(directory.iterdir()):
      if 'orbax-checkpoint-tmp' in path.name:
        _say(f'warning: ignoring the partially written checkpoint {path}')


def _restore_newest_readable(manager, checkpoint_dir, abstract, shardings):
  """(step, state, row states) of the newest checkpoint that reads back; others set aside."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return (step, *checkpoint_lib.restore(manager, step, abstract, shardings))
    except Exception as error:  # any failure to read: truncated, altered, missing files
      aside = epath.Path(checkpoint_dir) / f'{step}.unreadable'
      _say(f'warning: checkpoint {checkpoint_dir}/{step} cannot be read ({type(error).__name__}'
           f': {str(error)[:300]}); moved it to {aside} and trying the one before')
      if jax.process_index() == 0:
        (epath.Path(checkpoint_dir) / str(step)).rename(aside)
      _sync(f'set aside checkpoint {step}')
      manager.reload()
  raise UserError(f'no checkpoint in {checkpoint_dir} can be read (they were moved to '
                  '*.unreadable); move them elsewhere to start from scratch.')


def _write_failed(what: str, checkpoint_dir: str, error: Exception) -> UserError:
  """One sentence for Orbax's error on a full disk, a vanished bucket, a bad path."""
  return UserError(f'could not {what} to {checkpoint_dir} ({type(error).__name__}: '
                   f'{str(error)[:300]}); the earlier checkpoints are intact. Free space or '
                   'fix the workdir, then run again.')


def _save(manager, checkpoint_dir, step, state, rows, train_iterator, config_dict) -> None:
  try:
    checkpoint_lib.save(manager, step, state, rows.start, pipeline.row_states(train_iterator),
                        config_dict)
  except Exception as error:
    raise _write_failed(f'write checkpoint {step}', checkpoint_dir, error) from None


def _wait_for_saves(manager, checkpoint_dir) -> None:
  try:
    manager.wait_until_finished()
  except Exception as error:
    raise _write_failed('finish writing a checkpoint', checkpoint_dir, error) from None


@dataclasses.dataclass
class Setup:
  """What a config builds on a set of devices before any data or state exists."""
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  optimizer: optax.GradientTransformation
  abstract_state: train_lib.TrainState  # shapes only
  shardings: train_lib.TrainState  # the NamedSharding of every state leaf
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted; (state, batch) -> (state, metrics)
  n_params: int


def setup(config, devices) -> Setup:
  """Validates `config` for `devices` and builds the mesh, shardings and jitted step."""
  sizes = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config.mesh, len(devices))))
  model_config = validate(config, sizes, devices[0].platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  abstract = train_lib.abstract_state(model_config, optimizer)
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  step = train_lib.jit_train_step(
      mesh, rules, shardings, graphdef=train_lib.graphdef_of(model_config), optimizer=optimizer,
      learning_rate=optim.learning_rate_schedule(config.optim, config.train.steps),
      microbatches=config.train.microbatches, z_loss=config.train.z_loss,
      segment_mask=config.data.segment_mask, loss_chunks=config.train.loss_chunks)
  return Setup(model_config, mesh, rules, optimizer, abstract, shardings,
               sharding_lib.batch_sharding(mesh, rules), step,
               model_lib.count_params(model_lib.abstract_model(model_config)))


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  devices = jax.devices()
  built = setup(config, devices)
  model_config, mesh, rules = built.model_config, built.mesh, built.rules
  optimizer, abstract, shardings = built.optimizer, built.abstract_state, built.shardings
  batch_sharding, n_params = built.batch_sharding, built.n_params
  _check_workdir(workdir)
  train_config = config.train

  train_source, eval_source, tokenizer = prepare_data(config.data, model_config.vocab_size)

  batch_size, seq_len = train_config.batch_size, train_config.seq_len
  rows = sharding_lib.rows_of_process(batch_sharding, batch_size)

  train_iterator = iter(host_batches(config, train_source, tokenizer, rows, config.data.shuffle))
  checkpoint_dir = checkpoint_lib.directory_of(workdir, config.checkpoint.directory)
  _report_partial_checkpoints(checkpoint_dir)
  manager = checkpoint_lib.make_manager(checkpoint_dir, config.checkpoint)
  start = manager.latest_step()
  if start is not None:
    _check_checkpoint_matches(checkpoint_dir, start, model_config, workdir)
    start, state, row_states = _restore_newest_readable(manager, checkpoint_dir, abstract,
                                                        shardings)
    pipeline.set_row_states(train_iterator, row_states[rows.start:rows.stop])
    _say(f'Resumed from step {start} of {workdir}')
  else:
    state = train_lib.create_sharded_state(train_config.seed, model_config, optimizer, shardings)
    start = 0
    if config.checkpoint.init_params:  # fine-tuning: someone else's parameters, a new optimizer
      source = os.path.join(config.checkpoint.init_params, 'checkpoints')
      source_step = checkpoint_lib.find_step(source)
      _check_checkpoint_matches(source, source_step, model_config, config.checkpoint.init_params)
      state = state.replace(params=checkpoint_lib.restore_params(
          source, source_step, abstract.params, shardings.params))
      _say(f'Initialized the parameters from {source}/{source_step}')

  step_fn = built.train_step
  eval_fn = train_lib.jit_eval_step(mesh, rules, shardings.params,
                                    graphdef=train_lib.graphdef_of(model_config),
                                    segment_mask=config.data.segment_mask,
                                    loss_chunks=config.train.loss_chunks)

  train_batches = global_batches(train_iterator, batch_sharding, batch_size, rows)

  def evaluate():
    eval_batches = global_batches(iter(host_batches(config, eval_source, tokenizer, rows, False)),
                                  batch_sharding, batch_size, rows)
    nll, weight = 0.0, 0.0
    for _ in range(train_config.eval_batches):
      batch_nll, batch_weight = eval_fn(state.params, next(eval_batches))
      nll, weight = nll + batch_nll, weight + batch_weight
    return float(nll / weight)

  _say(str(config))
  _say(f'mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].device_kind} devices, '
       f'{jax.process_count()} process(es)')
  _say(f'model: {n_params:,} parameters; attention {model_config.attention}')

  config_dict = config.to_dict()
  peak = metrics_lib.peak_flops_per_device(devices[0], config.logging.cpu_peak_tflops)
  flops_per_token = metrics_lib.flops_per_token(model_config, seq_len, n_params)
  writer = metrics_lib.MetricsWriter(workdir)
  batch = next(train_batches)
  compile_start = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  _say(f'Compiled the train step in {time.perf_counter() - compile_start:.1f}s')

  last = {}
  interval_start, interval_steps = time.perf_counter(), 0
  profile_start = config.logging.profile_start
  bar = tqdm.tqdm(initial=start, total=train_config.steps, disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  stop_request = preemption.StopRequest()
  try:
    with stop_request:
      for step in range(start, train_config.steps):
        if step == profile_start:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        if step > start:
          batch = next(train_batches)
        state, metrics = step_fn(state, batch)
        interval_steps += 1
        done = step + 1
        if profile_start >= 0 and done == profile_start + config.logging.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()

        logging_step = done % config.logging.every_steps == 0 or done == train_config.steps
        if logging_step:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - interval_start
          tokens_per_s = interval_steps * batch_size * seq_len / elapsed
          tflops = flops_per_token * tokens_per_s / len(devices) / 1e12
          last = {'loss': float(metrics['loss']), 'lr': float(metrics['lr']),
                  'grad_norm': float(metrics['grad_norm']), 'tokens_per_s': tokens_per_s,
                  'tflops_per_device': tflops,
                  'mfu': tflops * 1e12 / peak if peak else float('nan'),
                  'skipped_steps': int(metrics['skipped_steps'])}
          writer.write(done, last)
          bar.set_postfix(loss=f'{last["loss"]:.3f}', lr=f'{last["lr"]:.2e}',
                          gnorm=f'{last["grad_norm"]:.2f}', tok_s=f'{tokens_per_s:,.0f}',
                          tflops=f'{tflops:.2f}', mfu=f'{last["mfu"]:.1%}',
                          skipped=last['skipped_steps'])
          if int(metrics['bad_steps']) >= train_config.max_bad_steps:
            raise UserError(f'{int(metrics["bad_steps"])} consecutive steps had a non-finite '
                            f'loss or gradient norm (up to step {done}); the last good '
                            'checkpoint is kept. Lower optim.learning_rate or check the data.')
          interval_start, interval_steps = time.perf_counter(), 0

        if train_config.eval_every and (done % train_config.eval_every == 0
                                        or done == train_config.steps):
          last['eval_loss'] = evaluate()
          writer.write(done, {'eval_loss': last['eval_loss']})
          bar.write(f'step {done}: eval_loss {last["eval_loss"]:.4f}')
          interval_start = time.perf_counter()

        stopping = stop_request.should_stop(logging_step)
        if done % config.checkpoint.every_steps == 0 or done == train_config.steps or stopping:
          _save(manager, checkpoint_dir, done, state, rows, train_iterator, config_dict)
        bar.update(1)
        if stopping:
          _wait_for_saves(manager, checkpoint_dir)
          bar.close()
          _say(f'Stopped at step {done} with a checkpoint in {checkpoint_dir}; run the same '
               'command to resume.')
          break
      _wait_for_saves(manager, checkpoint_dir)
  finally:
    bar.close()
    manager.close()
    writer.close()
  return last
