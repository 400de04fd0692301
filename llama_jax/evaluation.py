"""The evaluation library: restore parameters onto any mesh, perplexity, multiple choice.

train.py's periodic validation and eval.py share `perplexity` and the jitted eval step.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import model as model_lib
from llama_jax import steps
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
  for key, value in overrides.items():
    group, name = key.split('.', 1)
    config[group][name] = value
  return config, step


def restore_params(directory: str, step: int, model_config, shardings, bfloat16: bool = False):
  """The checkpoint's parameters, placed by `shardings` (the params of a state's)."""
  abstract = nnx.state(model_lib.abstract_model(model_config), nnx.Param)
  if bfloat16:  # Orbax casts while reading: half the memory, never float32 in between
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
  try:
    return checkpoint_lib.restore_params(directory, step, abstract, shardings)
  except Exception as error:  # Orbax and TensorStore raise many kinds for a damaged file
    raise UserError(f'checkpoint {directory}/{step} cannot be read ({type(error).__name__}: '
                    f'{str(error)[:200]}); it may be incomplete or damaged.') from None


def model_of(params, config):
  """The Transformer holding `params`, with `auto` attention resolved call by call."""
  model_config = model_lib.ModelConfig.from_config(config.model)
  return nnx.merge(steps.graphdef_of(model_config), params)


def byte_lengths(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token stands for: [vocab] (0 for BOS/EOS, 1 for byte tokens)."""
  lengths = np.zeros(tokenizer.vocab_size(), np.int32)
  for i in range(tokenizer.vocab_size()):
    if tokenizer.is_byte(i):
      lengths[i] = 1
    elif not (tokenizer.is_control(i) or tokenizer.is_unknown(i)):
      lengths[i] = len(tokenizer.id_to_piece(i).replace('\u2581', ' ').encode())
  return lengths


def perplexity(eval_step, params, batches, n_batches: int, token_bytes) -> dict:
  """Loss (nats per token), perplexity and bits per byte over n_batches global batches.

  eval_step: an Experiment's jitted eval step; token_bytes: byte_lengths(tokenizer).
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
  def of(documents, weights):
    host = iter(pipeline.host_batches(config, documents, weights, tokenizer, rows, shuffle=False))
    batches = pipeline.global_batches(host, batch_sharding, config.train.batch_size, rows)
    return perplexity(eval_step, params, batches, config.train.eval_batches, token_bytes)

  held_out = [(source, documents)
              for source, documents in zip(corpus.sources, corpus.eval)
              if documents is not None]
  if not held_out:
    raise UserError('no source has held-out documents to evaluate on; set train.eval_every=0 '
                    'or give data.eval_split a split with documents.')
  results = {'': of([d for _, d in held_out], [s.weight for s, _ in held_out])}
  if len(corpus.sources) > 1:
    for source, documents in held_out:
      results[source.name] = of([documents], [1.0])
  return results


@nnx.jit
def _continuation_logprobs(model, tokens, weights):
  """Sum over positions of weights * log p(token[t+1] | tokens[:t+1]): [rows]."""
  logits, _ = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(target_logp * weights[:, 1:], axis=-1)


@dataclasses.dataclass
class Choice:
  example: int
  tokens: list[int]
  continuation_start: int
  characters: int


def _continuation(tokenizer, context: str, choice: str) -> tuple[list[int], int]:
  """BOS + context + choice tokens, and where the choice's tokens start."""
  context_ids = [tokenizer.bos_id()] + tokenizer.encode(context)
  joint = [tokenizer.bos_id()] + tokenizer.encode(context + choice)
  if joint[:len(context_ids)] == context_ids and len(joint) > len(context_ids):
    return joint, len(context_ids)
  return context_ids + tokenizer.encode(choice), len(context_ids)


def multiple_choice(model, tokenizer, examples: list[dict], batch_size: int = 16) -> dict:
  """Zero-shot accuracy: the choice with the highest log-likelihood given the context.

  examples: {"context": str, "choices": [str], "label": int}. Reports the total
  log-likelihood accuracy and the per-character normalized one (LLaMA's evaluation).
  """
  choices = []
  for index, example in enumerate(examples):
    for text in example['choices']:
      tokens, start = _continuation(tokenizer, example['context'], text)
      choices.append(Choice(index, tokens, start, max(len(text), 1)))
  longest = max(len(c.tokens) for c in choices)
  length = 64 * -(-longest // 64)  # few distinct shapes: few compilations
  scores = []
  for first in range(0, len(choices), batch_size):
    chunk = choices[first:first + batch_size]
    tokens = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for row, choice in enumerate(chunk):
      tokens[row, :len(choice.tokens)] = choice.tokens
      weights[row, choice.continuation_start:len(choice.tokens)] = 1.0
    scores += np.asarray(_continuation_logprobs(model, tokens, weights))[:len(chunk)].tolist()
  by_example = [[] for _ in examples]
  for score, choice in zip(scores, choices):
    by_example[choice.example].append((score, choice))
  correct = correct_norm = 0
  for example, mine in zip(examples, by_example):
    correct += int(np.argmax([s for s, _ in mine]) == example['label'])
    correct_norm += int(np.argmax([s / c.characters for s, c in mine]) == example['label'])
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
      example = json.loads(line)
      if not {'context', 'choices', 'label'
             } <= set(example) or not (0 <= example['label'] < len(example['choices'])):
        raise UserError(f'{path}:{number} needs "context", "choices" and a "label" that '
                        'indexes the choices.')
      examples.append(example)
  return examples
