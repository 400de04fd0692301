"""The training loop: config + workdir -> a sharded, resumable run with metrics and checkpoints.

`train` builds the experiment (every check before anything compiles), opens the data,
restores the newest checkpoint or initializes, then runs the loop: one jitted step per
batch, metrics every `logging.every_steps` (the only host/device synchronization),
validation every `train.eval_every`, asynchronous checkpoints. Restarting with the same
workdir resumes exactly.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import tqdm
from etils import epath

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import evaluation
from llama_jax import experiment as experiment_lib
from llama_jax import goodput as goodput_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax import preemption
from llama_jax import processes
from llama_jax import sharding as sharding_lib
from llama_jax import steps
from llama_jax import watchdog as watchdog_lib
from llama_jax.data import mixture, pipeline
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

RESTORE_ATTEMPTS = 3  # reads of a checkpoint before a process calls it unreadable
# Model properties that fix the shapes of the parameters (a checkpoint must agree on them;
# the SwiGLU width, not the multiple_of / ffn_dim_multiplier that give it: a converted
# checkpoint states it one way, a paper config another).
SHAPE_KEYS = ('dim', 'n_layers', 'n_heads', 'kv_heads', 'vocab_size', 'hidden_dim',
              'tie_embeddings')
# Model properties the weights of checkpoint.init_params were trained with; a fine-tune keeps
# them. The rotary ones may change with checkpoint.allow_new_rope (context extension).
NUMERIC_KEYS = ('norm_eps', 'rope_theta', 'rope_scaling')
ROPE_KEYS = ('rope_theta', 'rope_scaling')


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
  try:
    saved = model_lib.ModelConfig.from_config(checkpoint_lib.saved_config(directory, step)['model'])
  except Exception:  # an unreadable checkpoint: restoring deals with it (and sets it aside)
    return
  different = [
      f'{k} {getattr(saved, k)} vs {getattr(model_config, k)}' for k in SHAPE_KEYS
      if getattr(saved, k) != getattr(model_config, k)
  ]
  if different:
    raise UserError(f'{workdir} holds a checkpoint of a different model '
                    f'({", ".join(different)}, saved vs now); use another --workdir or the '
                    'saved model config.')


def _config_value(value):
  """A model config value as one writes it in a config (a rope scaling as its dict)."""
  return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def check_init_model(config, model_config) -> None:
  """Stops unless checkpoint.init_params holds this run's model: its shapes, and the norm
  epsilon and rotary embedding its weights were trained with (the rotary ones may differ
  with checkpoint.allow_new_rope)."""
  init_params = config.checkpoint.init_params
  if not init_params:
    return
  directory = os.path.join(init_params, 'checkpoints')
  step = checkpoint_lib.find_step(directory)
  _check_checkpoint_matches(directory, step, model_config, init_params)
  try:
    saved = model_lib.ModelConfig.from_config(checkpoint_lib.saved_config(directory, step)['model'])
  except Exception:  # an unreadable checkpoint: restoring it says so
    return
  keys = [
      k for k in NUMERIC_KEYS if getattr(saved, k) != getattr(model_config, k) and
      not (config.checkpoint.allow_new_rope and k in ROPE_KEYS)
  ]
  if keys:
    trained = ', '.join(f'model.{k}={_config_value(getattr(saved, k))!r}' for k in keys)
    now = ', '.join(f'{_config_value(getattr(model_config, k))!r}' for k in keys)
    rope = (' (or checkpoint.allow_new_rope=True to change its rotary embedding on purpose, as '
            'context extension does)' if set(keys) & set(ROPE_KEYS) else '')
    raise UserError(f'checkpoint.init_params {init_params} was trained with {trained} but this '
                    f'run has {now}; set {trained} to fine-tune it as it was trained{rope}.')


def _report_partial_checkpoints(checkpoint_dir: str) -> None:
  directory = epath.Path(checkpoint_dir)
  if directory.is_dir():
    for path in sorted(directory.iterdir()):
      if 'orbax-checkpoint-tmp' in path.name:
        processes.say(f'warning: ignoring the partially written checkpoint {path}')


def _read(checkpoint_dir, step, abstract, shardings):
  """((state, row states), None) or (None, the error) after RESTORE_ATTEMPTS tries: a
  transient error (a bucket hiccup) is retried after 1, 2, 4... seconds."""
  for attempt in range(RESTORE_ATTEMPTS):
    try:
      return checkpoint_lib.restore(checkpoint_dir, step, abstract, shardings), None
    except Exception as error:  # any failure to read: truncated, altered, missing files
      if attempt + 1 == RESTORE_ATTEMPTS:
        return None, error
      time.sleep(2**attempt)


def _restore_newest_readable(manager, checkpoint_dir, abstract, shardings):
  """(step, state, row states) of the newest checkpoint that every process can read.

  Each process reads its own shards, then all agree. Newer checkpoints that some process
  could not read are set aside (process 0 renames them STEP.unreadable, never deletes
  them) once an older one has read back everywhere, so all resume from the same step. If
  none can be read, nothing is moved: that is usually a config that no longer matches them.
  """
  unreadable, first_error = [], None
  for step in sorted(manager.all_steps(), reverse=True):
    restored, error = _read(checkpoint_dir, step, abstract, shardings)
    if processes.all_true(error is None):
      for bad in unreadable:
        aside = epath.Path(checkpoint_dir) / f'{bad}.unreadable'
        processes.say(f'warning: checkpoint {checkpoint_dir}/{bad} cannot be read by every '
                      f'process; moved it to {aside}')
        if jax.process_index() == 0:
          (epath.Path(checkpoint_dir) / str(bad)).rename(aside)
      processes.sync('set aside unreadable checkpoints')
      manager.reload()
      return (step, *restored)
    if error is not None:
      first_error = first_error or error
      print(
          f'warning: process {jax.process_index()} cannot read checkpoint {checkpoint_dir}/'
          f'{step} ({type(error).__name__}: {str(error)[:300]})', flush=True)
    unreadable.append(step)
  reason = f' ({type(first_error).__name__}: {str(first_error)[:200]})' if first_error else ''
  raise UserError(f'no checkpoint in {checkpoint_dir} can be read by every process{reason}; '
                  'none was moved. If the config changed since they were written (model, optim '
                  'or mesh.rules), run with the one they were written with; or move the folder '
                  'away to start over.')


def _write_failed(what: str, checkpoint_dir: str, error: Exception) -> UserError:
  """One sentence for Orbax's error on a full disk, a vanished bucket, a bad path."""
  return UserError(f'could not {what} to {checkpoint_dir} ({type(error).__name__}: '
                   f'{str(error)[:300]}); the earlier checkpoints are intact. Free space or '
                   'fix the workdir, then run again.')


def _save(manager, checkpoint_dir, step, state, rows, train_iterator, config_dict, base) -> None:
  try:
    checkpoint_lib.save(manager, step, state, rows.start, pipeline.row_states(train_iterator),
                        config_dict, base)
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
  corpus: mixture.Corpus  # the sources, their weights and documents
  train_iterator: object  # host batches of the train split (its state is checkpointed)
  progress: pipeline.Progress  # epochs read per source
  tokenizer: object
  token_bytes: jax.Array  # [vocab] UTF-8 bytes per token, for bits per byte


def _open_data(config, experiment: experiment_lib.Experiment, workdir: str) -> Data:
  corpus = mixture.open_corpus(config.data, validation=config.train.eval_every > 0)
  # A fine-tuned model's tokenizer goes with it, for eval.py --workdir to find.
  init_tokenizer = tokenizer_lib.beside(config.checkpoint.init_params or '')
  if init_tokenizer and not config.data.tokenizer:
    tokenizer_lib.copy_beside(init_tokenizer, workdir)
  tokenizer = tokenizer_lib.for_data(config.data, experiment.model_config.vocab_size, corpus,
                                     checkpoints=(workdir,))
  rows = sharding_lib.rows_of_process(experiment.batch_sharding, config.train.batch_size)
  progress = pipeline.Progress([len(documents) for documents in corpus.train])
  train_iterator = iter(
      pipeline.host_batches(config, corpus.train, corpus.weights, tokenizer, rows,
                            config.data.shuffle, progress, corpus.sources))
  return Data(rows, corpus, train_iterator, progress, tokenizer,
              jnp.asarray(tokenizer.token_bytes()))


def _check_init_params(init_params: str) -> None:
  if init_params and not epath.Path(init_params, 'checkpoints').is_dir():
    raise UserError(f'checkpoint.init_params {init_params} holds no checkpoints/ to start from; '
                    f'train it first (`python train.py --workdir={init_params}`) or write it '
                    'with `python -m llama_jax.convert`.')


def _lora_base(config, model_config) -> dict | None:
  """The base checkpoint a LoRA run adapts ({'directory', 'step'}); None without LoRA."""
  if not model_config.lora.rank:
    return None
  if not config.checkpoint.init_params:
    raise UserError('model.lora.rank > 0 trains adapters on a frozen base model; set '
                    'checkpoint.init_params to its workdir (a train.py run or a '
                    'llama_jax.convert output), or model.lora.rank=0 to train every parameter.')
  source = checkpoint_lib.absolute(os.path.join(config.checkpoint.init_params, 'checkpoints'))
  return {'directory': source, 'step': checkpoint_lib.find_step(source)}


def _check_same_base(checkpoint_dir: str, step: int, base: dict, workdir: str) -> None:
  try:
    saved = checkpoint_lib.saved_base(checkpoint_dir, step)
  except Exception:
    raise UserError(f'{workdir} holds a checkpoint without LoRA adapters; use another --workdir '
                    'for a LoRA run, or model.lora.rank=0 to resume it.') from None
  if saved != base:
    raise UserError(f'the adapters in {workdir} apply to the base {saved["directory"]} step '
                    f'{saved["step"]}, not to {base["directory"]} step {base["step"]}; set '
                    'checkpoint.init_params back to their base, or use another --workdir.')


def _restore_base(base: dict, experiment) -> object:
  """The frozen base parameters of a LoRA run, read in the compute dtype."""
  frozen = checkpoint_lib.restore_params(base['directory'], base['step'],
                                         experiment.abstract_state.frozen,
                                         experiment.shardings.frozen)
  processes.say(f'Adapting the frozen base {base["directory"]}/{base["step"]}')
  return frozen


def _restore_or_initialize(config, experiment, manager, checkpoint_dir, workdir, data: Data,
                           base: dict | None):
  """(state, first step): the newest readable checkpoint, else a fresh sharded state
  (with another run's parameters when fine-tuning; with LoRA, they are the frozen base)."""
  model_config, abstract, shardings = (experiment.model_config, experiment.abstract_state,
                                       experiment.shardings)
  if manager.latest_step() is not None:
    _check_checkpoint_matches(checkpoint_dir, manager.latest_step(), model_config, workdir)
    if base is not None:
      _check_same_base(checkpoint_dir, manager.latest_step(), base, workdir)
    start, state, row_states = _restore_newest_readable(manager, checkpoint_dir, abstract,
                                                        shardings)
    if base is not None:
      state = state.replace(frozen=_restore_base(base, experiment))
    pipeline.set_row_states(data.train_iterator, row_states[data.rows.start:data.rows.stop])
    processes.say(f'Resumed from step {start} of {workdir}')
    return state, start
  state = experiment.create_state(config.train.seed)
  if base is not None:
    state = state.replace(frozen=_restore_base(base, experiment))
  elif config.checkpoint.init_params:  # fine-tuning: someone else's parameters, a new optimizer
    source = os.path.join(config.checkpoint.init_params, 'checkpoints')
    source_step = checkpoint_lib.find_step(source)
    float32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract.params)
    state = steps.with_params(
        state, checkpoint_lib.restore_params(source, source_step, float32, shardings.params))
    processes.say(f'Initialized the parameters from {source}/{source_step}')
  return state, 0


def _validation(config, experiment, params, data: Data) -> dict:
  """The logged validation row: loss and bits per byte of the mixture, loss per source."""
  results = evaluation.perplexity_by_source(config, experiment.eval_step, params, data.corpus,
                                            data.tokenizer, data.rows, experiment.batch_sharding,
                                            data.token_bytes)
  row = {'eval_loss': results['']['loss'], 'eval_bits_per_byte': results['']['bits_per_byte']}
  row.update({f'eval_loss/{name}': result['loss'] for name, result in results.items() if name})
  if config.train.eval_tasks:
    row.update(
        evaluation.run_tasks(evaluation.model_of(params, config), data.tokenizer,
                             config.train.eval_tasks, config.train.eval_task_dir))
  return row


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


def _furthest_logged_step(workdir: str) -> int:
  """The last step an earlier run of this workdir logged (0 if none): to count redone steps."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if jax.process_index() != 0 or not path.exists():
    return 0
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line).get('step', 0))
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
  return max(steps, default=0)


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  goodput = goodput_lib.Goodput()
  with goodput.timing('startup'):
    devices = jax.devices()
    experiment = experiment_lib.build(config, devices)
    evaluation.check_tasks(config.train.eval_tasks, config.train.eval_task_dir)
    _check_workdir(workdir)
    _check_init_params(config.checkpoint.init_params)
    check_init_model(config, experiment.model_config)
    base = _lora_base(config, experiment.model_config)
    data = _open_data(config, experiment, workdir)
    checkpoint_dir = checkpoint_lib.directory_of(workdir, config.checkpoint.directory)
    _report_partial_checkpoints(checkpoint_dir)
    manager = checkpoint_lib.make_manager(checkpoint_dir, config.checkpoint)
    state, start = _restore_or_initialize(config, experiment, manager, checkpoint_dir, workdir,
                                          data, base)
    goodput.redone_steps = max(_furthest_logged_step(workdir) - start, 0)
  processes.say(str(config))
  processes.say(f'mesh: {dict(experiment.mesh.shape)} over {len(devices)} '
                f'{devices[0].device_kind} devices, {jax.process_count()} process(es)')
  processes.say(f'model: {experiment.n_params:,} parameters; attention '
                f'{experiment.model_config.attention}')
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    last = _loop(config, experiment, state, start, data, manager, checkpoint_dir, workdir, writer,
                 goodput, base)
  except BaseException:
    _close_after_failure(manager, writer)
    raise
  processes.say(goodput.summary())
  manager.close()
  writer.close()
  return last


def _close_after_failure(manager, writer) -> None:
  """Closes what a failed run opened, so that the error which stopped the run is the one the user
  sees (closing can fail for the same reason, e.g. a full disk, and would hide it)."""
  for close in (manager.close, writer.close):
    try:
      close()
    except Exception as error:  # the run's own error is re-raised by the caller
      processes.say(f'While stopping: {type(error).__name__}: {error}')


def _loop(config, experiment, state, start, data: Data, manager, checkpoint_dir, workdir, writer,
          goodput, base) -> dict:
  """Steps from `start` to `train.steps`, logging, validating and saving on the way."""
  train_config, devices = config.train, jax.devices()
  batch_size, seq_len = train_config.batch_size, train_config.seq_len
  batches = pipeline.global_batches(data.train_iterator, experiment.batch_sharding, batch_size,
                                    data.rows)
  peak = metrics_lib.peak_flops_per_device(devices[0], config.logging.cpu_peak_tflops)
  flops_per_token = metrics_lib.flops_per_token(experiment.model_config, seq_len,
                                                experiment.n_params)
  config_dict = config.to_dict()
  with goodput.timing('data'):
    batch = next(batches)
  with goodput.timing('compile'):
    compile_start = time.perf_counter()
    step_fn = experiment.train_step.lower(state, batch).compile()
  processes.say(f'Compiled the train step in {time.perf_counter() - compile_start:.1f}s')

  last, timer = {}, metrics_lib.IntervalTimer()
  profile_start = config.logging.profile_start
  bar = tqdm.tqdm(initial=start, total=train_config.steps, disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  stop_request = preemption.StopRequest()
  watchdog = watchdog_lib.HangWatchdog(train_config.hang_timeout_s, jax.process_index())
  try:
    with stop_request, watchdog:
      for step in range(start, train_config.steps):
        if step == profile_start:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        if step > start:
          with goodput.timing('data'):
            batch = next(batches)
        state, metrics = step_fn(state, batch)
        done = step + 1
        timer.step()
        goodput.step_done()
        watchdog.beat(done)
        if profile_start >= 0 and done == profile_start + config.logging.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()

        logging_step = done % config.logging.every_steps == 0 or done == train_config.steps
        if logging_step:
          last = _metrics_row(metrics, *timer.lap(), batch_size * seq_len, flops_per_token,
                              len(devices), peak)
          epochs = {
              f'data/epochs/{source.name}': epochs
              for source, epochs in zip(data.corpus.sources, data.progress.epochs())
          }
          epochs.update({  # conversations longer than a row, truncated or dropped so far
              f'data/overlong/{source.name}': count
              for source, count in zip(data.corpus.sources, data.progress.overlong)
              if source.format != 'text'
          })
          writer.write(done, {**last, **epochs, **goodput.row()})
          bar.set_postfix(_progress(last))
          if int(metrics['bad_steps']) >= train_config.max_bad_steps:
            raise UserError(f'{int(metrics["bad_steps"])} consecutive steps had a non-finite '
                            f'loss or gradient norm (up to step {done}); the last good '
                            'checkpoint is kept. Lower optim.learning_rate or check the data.')

        if train_config.eval_every and (done % train_config.eval_every == 0 or
                                        done == train_config.steps):
          # Not training throughput, and no hang however long the tasks take.
          with timer.paused(), goodput.timing('evaluation'), watchdog.paused():
            validation = _validation(config, experiment, steps.all_params(state), data)
          last.update(validation)
          writer.write(done, validation)
          bar.write(f'step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in validation.items()))

        stopping = stop_request.should_stop(logging_step)
        if done % config.checkpoint.every_steps == 0 or done == train_config.steps or stopping:
          with timer.paused(), goodput.timing('checkpoint'):
            _save(manager, checkpoint_dir, done, state, data.rows, data.train_iterator, config_dict,
                  base)
        bar.update(1)
        if stopping:
          with goodput.timing('checkpoint'):
            _wait_for_saves(manager, checkpoint_dir)
          bar.close()
          processes.say(f'Stopped at step {done} with a checkpoint in {checkpoint_dir}; run '
                        'the same command to resume.')
          break
      with goodput.timing('checkpoint'):
        _wait_for_saves(manager, checkpoint_dir)
  finally:
    bar.close()
  return last


def _progress(row: dict) -> dict:
  """The progress bar's fields from a logged row."""
  fields = dict(loss=f'{row["loss"]:.3f}', lr=f'{row["lr"]:.2e}', gnorm=f'{row["grad_norm"]:.2f}',
                tok_s=f'{row["tokens_per_s"]:,.0f}', tflops=f'{row["tflops_per_device"]:.2f}')
  if 'mfu' in row:
    fields['mfu'] = f'{row["mfu"]:.1%}'
  return {**fields, 'skipped': row['skipped_steps']}
