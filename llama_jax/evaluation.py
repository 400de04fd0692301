"""The evaluation library: restore parameters onto any mesh, perplexity, multiple choice.

train.py's periodic validation and eval.py share `perplexity` and the jitted eval step.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import config_flag
from llama_jax import lora
from llama_jax import model as model_lib
from llama_jax import scoring, steps
from llama_jax.data import pipeline
from llama_jax.errors import UserError


def load_config(directory: str, step: int | None, overrides: dict, defaults):
  """(config, step): the config saved with checkpoint `step` (default: the newest) in
  `directory`, with command-line overrides. Converted weights carry only the model: the
  other groups come from `defaults` (configs/default.py)."""
  step = checkpoint_lib.find_step(directory, step)
  saved = checkpoint_lib.saved_config(directory, step)
  if 'mesh' not in saved:
    base = ml_collections.ConfigDict(defaults.to_dict())
    base.model.update(saved['model'])
    base.train.seq_len = min(base.train.seq_len, base.model.max_seq_len)
    saved = base.to_dict()
  config = ml_collections.ConfigDict(saved)
  config_flag.apply(config, overrides)
  return config, step


def restore_params(directory: str, step: int, model_config, shardings, bfloat16: bool = False):
  """Every parameter of checkpoint `step`, placed by `shardings` (an Experiment's
  params_shardings). A LoRA run's checkpoint holds adapters: they come with the base they
  apply to, read in the compute dtype as in training."""
  abstract = nnx.state(model_lib.abstract_model(model_config), nnx.Param)
  if bfloat16:  # Orbax casts while reading: half the memory, never float32 in between
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
  if not model_config.lora.rank:
    return _read_params(directory, step, abstract, shardings)
  adapters, base = nnx.split_state(abstract, lora.Adapter, ...)
  adapter_shardings, base_shardings = nnx.split_state(shardings, lora.Adapter, ...)
  base = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model_config.compute_dtype), base)
  source = checkpoint_lib.saved_base(directory, step)
  if not epath.Path(source['directory'], str(source['step'])).is_dir():
    raise UserError(f'the adapters in {directory}/{step} apply to the base checkpoint '
                    f'{source["directory"]}/{source["step"]}, which is gone; put it back there.')
  return nnx.merge_state(_read_params(directory, step, adapters, adapter_shardings),
                         _read_params(source['directory'], source['step'], base, base_shardings))


def _read_params(directory: str, step: int, abstract, shardings):
  try:
    return checkpoint_lib.restore_params(directory, step, abstract, shardings)
  except Exception as error:  # Orbax and TensorStore raise many kinds for a damaged file
    raise UserError(f'checkpoint {directory}/{step} cannot be read ({type(error).__name__}: '
                    f'{str(error)[:200]}); it may be incomplete or damaged.') from None


def model_of(params, config):
  """The Transformer holding `params`, with `auto` attention resolved call by call."""
  model_config = model_lib.ModelConfig.from_config(config.model)
  return nnx.merge(steps.graphdef_of(model_config), params)


def perplexity(eval_step, params, batches, n_batches: int, token_bytes) -> dict:
  """Loss (nats per token), perplexity and bits per byte over n_batches global batches.

  eval_step: an Experiment's jitted eval step; token_bytes: tokenizer.token_bytes().
  """
  nll, weight, n_bytes = 0.0, 0.0, 0.0
  for _ in range(n_batches):
    sums = jax.device_get(eval_step(params, next(batches), token_bytes))
    nll, weight, n_bytes = nll + float(sums[0]), weight + float(sums[1]), n_bytes + float(sums[2])
  loss = nll / weight
  return {
      'loss': loss,
      'perplexity': math.exp(loss),
      'bits_per_byte': nll / math.log(2) / n_bytes,
      'tokens': int(weight)
  }


def perplexity_by_source(config, eval_step, params, corpus, tokenizer, rows: range, batch_sharding,
                         token_bytes) -> dict:
  """{'': perplexity of the mixture of the sources' eval splits, NAME: of each source}
  (the per-source entries only when there are several), `train.eval_batches` each."""
  def of(sources, documents):
    weights = [source.weight for source in sources]
    host = iter(
        pipeline.host_batches(config, documents, weights, tokenizer, rows, shuffle=False,
                              sources=sources))
    batches = pipeline.global_batches(host, batch_sharding, config.train.batch_size, rows)
    return perplexity(eval_step, params, batches, config.train.eval_batches, token_bytes)

  held_out = [(source, documents)
              for source, documents in zip(corpus.sources, corpus.eval)
              if documents is not None]
  if not held_out:
    raise UserError('no source has held-out documents to evaluate on; set train.eval_every=0 '
                    'or give data.eval_split a split with documents.')
  results = {'': of([s for s, _ in held_out], [d for _, d in held_out])}
  if len(corpus.sources) > 1:
    for source, documents in held_out:
      results[source.name] = of([source], [documents])
  return results


def multiple_choice(model, tokenizer, examples: list[dict], batch_size: int = 16) -> dict:
  """Zero-shot accuracy: the choice with the highest log-likelihood given the context.

  examples: {"context": str, "choices": [str], "label": int}. Reports the total
  log-likelihood accuracy and the per-character normalized one (LLaMA's evaluation).
  """
  owners, sequences, characters = [], [], []
  for index, example in enumerate(examples):
    for text in example['choices']:
      owners.append(index)
      sequences.append(scoring.continuation_tokens(tokenizer, example['context'], text))
      characters.append(max(len(text), 1))
  scores = [score for score, _ in scoring.score_continuations(model, sequences, batch_size)]
  by_example = [[] for _ in examples]
  for owner, score, length in zip(owners, scores, characters):
    by_example[owner].append((score, length))
  correct = correct_norm = 0
  for example, mine in zip(examples, by_example):
    correct += int(np.argmax([s for s, _ in mine]) == example['label'])
    correct_norm += int(np.argmax([s / n for s, n in mine]) == example['label'])
  return {
      'accuracy': correct / len(examples),
      'accuracy_norm': correct_norm / len(examples),
      'examples': len(examples)
  }


def read_task(path: str) -> list[dict]:
  """A JSONL task file: one {"context", "choices", "label"} object per line."""
  if not os.path.exists(path):
    raise UserError(f'task file {path} does not exist.')
  examples = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError:
        raise UserError(f'{path}:{number} is not a JSON object.') from None
      valid = (isinstance(example, dict) and {'context', 'choices', 'label'} <= set(example) and
               isinstance(example['label'], int) and isinstance(example['choices'], list) and
               0 <= example['label'] < len(example['choices']))
      if not valid:
        raise UserError(f'{path}:{number} needs "context", "choices" and a "label" that '
                        'indexes the choices.')
      examples.append(example)
  return examples


def harness_module():
  """llama_jax.harness (the eval extra), or one sentence saying how to install it."""
  try:
    from llama_jax import harness
  except ImportError:
    raise UserError("harness tasks need lm-eval: pip install -e '.[eval]'.") from None
  return harness


def _files_and_names(tasks) -> tuple[list[str], list[str]]:
  """Our JSONL task files, and the harness's task names."""
  files = [task for task in tasks if task.endswith('.jsonl')]
  return files, [task for task in tasks if task not in files]


def check_tasks(tasks, task_dir: str = '') -> None:
  """One clear error now, not hours into a run, for a task that cannot be run."""
  files, names = _files_and_names(tasks)
  for path in files:
    read_task(path)
  if names:
    harness_module().check_names(names, task_dir)


def run_tasks(model, tokenizer, tasks, task_dir: str = '') -> dict:
  """{'task/NAME/METRIC': value} for JSONL task files (our multiple choice; NAME is the
  file's name without .jsonl) and lm-evaluation-harness tasks (YAML under task_dir or the
  harness's own)."""
  row = {}
  files, names = _files_and_names(tasks)
  for path in files:
    result = multiple_choice(model, tokenizer, read_task(path))
    name = os.path.basename(path).removesuffix('.jsonl')
    row[f'task/{name}/accuracy'] = result['accuracy']
    row[f'task/{name}/accuracy_norm'] = result['accuracy_norm']
  if names:
    harness = harness_module()
    results = harness.evaluate(harness.HarnessModel(model, tokenizer), names, task_dir)
    row.update({
        f'task/{name}/{metric}': value for name, metrics in results.items()
        for metric, value in metrics.items()
    })
  return row
