"""The training loop: config + workdir -> a sharded, resumable run with metrics and checkpoints.

`train` builds the experiment (every check before anything compiles), opens the data,
restores the newest checkpoint or initializes, then runs the loop: one jitted step per
batch, metrics every `logging.every_steps` (the only host/device synchronization),
validation every `train.eval_every`, asynchronous checkpoints. Restarting with the same
workdir resumes exactly.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import tqdm
from etils import epath

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import evaluation
from llama_jax import experiment as experiment_lib
from llama_jax import metrics as metrics_lib
from llama_jax import preemption
from llama_jax import processes
from llama_jax import sharding as sharding_lib
from llama_jax import steps
from llama_jax.data import pipeline, sources
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

# Model keys that fix the shapes of the parameters (a checkpoint must agree on them).
SHAPE_KEYS = ('dim', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size', 'multiple_of',
              'ffn_dim_multiplier')


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
  different = [
      f'{k} {saved.get(k)} vs {current[k]}' for k in SHAPE_KEYS if saved.get(k) != current[k]
  ]
  if different:
    raise UserError(f'{workdir} holds a checkpoint of a different model '
                    f'({", ".join(different)}, saved vs now); use another --workdir or the '
                    'saved model config.')


def _report_partial_checkpoints(checkpoint_dir: str) -> None:
  directory = epath.Path(checkpoint_dir)
  if directory.is_dir():
    for path in sorted(directory.iterdir()):
      if 'orbax-checkpoint-tmp' in path.name:
        processes.say(f'warning: ignoring the partially written checkpoint {path}')


def _restore_newest_readable(manager, checkpoint_dir, abstract, shardings):
  """(step, state, row states) of the newest checkpoint that reads back; others set aside."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return (step, *checkpoint_lib.restore(manager, step, abstract, shardings))
    except Exception as error:  # any failure to read: truncated, altered, missing files
      aside = epath.Path(checkpoint_dir) / f'{step}.unreadable'
      processes.say(
          f'warning: checkpoint {checkpoint_dir}/{step} cannot be read ({type(error).__name__}'
          f': {str(error)[:300]}); moved it to {aside} and trying the one before')
      if jax.process_index() == 0:
        (epath.Path(checkpoint_dir) / str(step)).rename(aside)
      processes.sync(f'set aside checkpoint {step}')
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
class Data:
  """This process's view of the data: its rows of the global batch and their streams."""
  rows: range  # the global batch rows this process loads
  train_iterator: object  # host batches of the train split (its state is checkpointed)
  eval_source: object
  tokenizer: object
  token_bytes: jax.Array  # [vocab] UTF-8 bytes per token, for bits per byte


def _open_data(config, experiment: experiment_lib.Experiment) -> Data:
  builder, train_source, eval_source = sources.open_sources(config.data)
  tokenizer = tokenizer_lib.for_data(config.data, experiment.model_config.vocab_size, builder,
                                     train_source)
  rows = sharding_lib.rows_of_process(experiment.batch_sharding, config.train.batch_size)
  train_iterator = iter(
      pipeline.host_batches(config, train_source, tokenizer, rows, config.data.shuffle))
  return Data(rows, train_iterator, eval_source, tokenizer,
              jnp.asarray(evaluation.byte_lengths(tokenizer)))


def _restore_or_initialize(config, experiment, manager, checkpoint_dir, workdir, data: Data):
  """(state, first step): the newest readable checkpoint, else a fresh sharded state
  (with another run's parameters when fine-tuning)."""
  model_config, abstract, shardings = (experiment.model_config, experiment.abstract_state,
                                       experiment.shardings)
  if manager.latest_step() is not None:
    _check_checkpoint_matches(checkpoint_dir, manager.latest_step(), model_config, workdir)
    start, state, row_states = _restore_newest_readable(manager, checkpoint_dir, abstract,
                                                        shardings)
    pipeline.set_row_states(data.train_iterator, row_states[data.rows.start:data.rows.stop])
    processes.say(f'Resumed from step {start} of {workdir}')
    return state, start
  state = steps.create_sharded_state(config.train.seed, model_config, experiment.optimizer,
                                     shardings)
  if config.checkpoint.init_params:  # fine-tuning: someone else's parameters, a new optimizer
    source = os.path.join(config.checkpoint.init_params, 'checkpoints')
    source_step = checkpoint_lib.find_step(source)
    _check_checkpoint_matches(source, source_step, model_config, config.checkpoint.init_params)
    state = state.replace(params=checkpoint_lib.restore_params(source, source_step, abstract.params,
                                                               shardings.params))
    processes.say(f'Initialized the parameters from {source}/{source_step}')
  return state, 0


def _validation(config, experiment, params, data: Data) -> dict:
  """Loss, perplexity and bits per byte on `train.eval_batches` validation batches."""
  host = iter(
      pipeline.host_batches(config, data.eval_source, data.tokenizer, data.rows, shuffle=False))
  batches = pipeline.global_batches(host, experiment.batch_sharding, config.train.batch_size,
                                    data.rows)
  return evaluation.perplexity(experiment.eval_step, params, batches, config.train.eval_batches,
                               data.token_bytes)


def _metrics_row(metrics, steps_done: int, seconds: float, tokens_per_step: int,
                 flops_per_token: float, devices: int, peak) -> dict:
  """The logged row: the step's metrics and the throughput over the last interval."""
  metrics = jax.device_get(metrics)
  tokens_per_s = steps_done * tokens_per_step / seconds
  tflops = flops_per_token * tokens_per_s / devices / 1e12
  row = {
      'loss': float(metrics['loss']),
      'lr': float(metrics['lr']),
      'grad_norm': float(metrics['grad_norm']),
      'tokens_per_s': tokens_per_s,
      'tflops_per_device': tflops,
      'skipped_steps': int(metrics['skipped_steps'])
  }
  if peak:
    row['mfu'] = tflops * 1e12 / peak
  return row


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  devices = jax.devices()
  experiment = experiment_lib.build(config, devices)
  _check_workdir(workdir)
  data = _open_data(config, experiment)
  checkpoint_dir = checkpoint_lib.directory_of(workdir, config.checkpoint.directory)
  _report_partial_checkpoints(checkpoint_dir)
  manager = checkpoint_lib.make_manager(checkpoint_dir, config.checkpoint)
  state, start = _restore_or_initialize(config, experiment, manager, checkpoint_dir, workdir, data)
  processes.say(str(config))
  processes.say(f'mesh: {dict(experiment.mesh.shape)} over {len(devices)} '
                f'{devices[0].device_kind} devices, {jax.process_count()} process(es)')
  processes.say(f'model: {experiment.n_params:,} parameters; attention '
                f'{experiment.model_config.attention}')
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    return _loop(config, experiment, state, start, data, manager, checkpoint_dir, workdir, writer)
  finally:
    manager.close()
    writer.close()


def _loop(config, experiment, state, start, data: Data, manager, checkpoint_dir, workdir,
          writer) -> dict:
  """Steps from `start` to `train.steps`, logging, validating and saving on the way."""
  train_config, devices = config.train, jax.devices()
  batch_size, seq_len = train_config.batch_size, train_config.seq_len
  batches = pipeline.global_batches(data.train_iterator, experiment.batch_sharding, batch_size,
                                    data.rows)
  peak = metrics_lib.peak_flops_per_device(devices[0], config.logging.cpu_peak_tflops)
  flops_per_token = metrics_lib.flops_per_token(experiment.model_config, seq_len,
                                                experiment.n_params)
  config_dict = config.to_dict()
  batch = next(batches)
  compile_start = time.perf_counter()
  step_fn = experiment.train_step.lower(state, batch).compile()
  processes.say(f'Compiled the train step in {time.perf_counter() - compile_start:.1f}s')

  last, timer = {}, metrics_lib.IntervalTimer()
  profile_start = config.logging.profile_start
  bar = tqdm.tqdm(initial=start,
                  total=train_config.steps,
                  disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  stop_request = preemption.StopRequest()
  try:
    with stop_request:
      for step in range(start, train_config.steps):
        if step == profile_start:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        if step > start:
          batch = next(batches)
        state, metrics = step_fn(state, batch)
        timer.step()
        done = step + 1
        if profile_start >= 0 and done == profile_start + config.logging.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()

        logging_step = done % config.logging.every_steps == 0 or done == train_config.steps
        if logging_step:
          last = _metrics_row(metrics, *timer.lap(), batch_size * seq_len, flops_per_token,
                              len(devices), peak)
          writer.write(done, last)
          bar.set_postfix(loss=f'{last["loss"]:.3f}',
                          lr=f'{last["lr"]:.2e}',
                          gnorm=f'{last["grad_norm"]:.2f}',
                          tok_s=f'{last["tokens_per_s"]:,.0f}',
                          tflops=f'{last["tflops_per_device"]:.2f}',
                          **({
                              'mfu': f'{last["mfu"]:.1%}'
                          } if 'mfu' in last else {}),
                          skipped=last['skipped_steps'])
          if int(metrics['bad_steps']) >= train_config.max_bad_steps:
            raise UserError(f'{int(metrics["bad_steps"])} consecutive steps had a non-finite '
                            f'loss or gradient norm (up to step {done}); the last good '
                            'checkpoint is kept. Lower optim.learning_rate or check the data.')

        if train_config.eval_every and (done % train_config.eval_every == 0 or
                                        done == train_config.steps):
          with timer.paused():  # validation time is not training throughput
            validation = _validation(config, experiment, state.params, data)
          last['eval_loss'] = validation['loss']
          writer.write(done, {
              'eval_loss': validation['loss'],
              'eval_bits_per_byte': validation['bits_per_byte']
          })
          bar.write(f'step {done}: eval_loss {validation["loss"]:.4f}')

        stopping = stop_request.should_stop(logging_step)
        if done % config.checkpoint.every_steps == 0 or done == train_config.steps or stopping:
          _save(manager, checkpoint_dir, done, state, data.rows, data.train_iterator, config_dict)
        bar.update(1)
        if stopping:
          _wait_for_saves(manager, checkpoint_dir)
          bar.close()
          processes.say(f'Stopped at step {done} with a checkpoint in {checkpoint_dir}; run '
                        'the same command to resume.')
          break
      _wait_for_saves(manager, checkpoint_dir)
  finally:
    bar.close()
  return last
