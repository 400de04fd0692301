"""Evaluation of a checkpoint: restore parameters onto any mesh, perplexity, multiple choice."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import default
from llama_jax import checkpoint as checkpoint_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sharding_lib
from llama_jax import train_lib
from llama_jax.errors import UserError


def load_config(directory: str, step: int | None, overrides: dict):
  """(config, step): the config saved with checkpoint `step` (default: the newest) in
  `directory`, with command-line overrides."""
  step = checkpoint_lib.find_step(directory, step)
  saved = checkpoint_lib.saved_config(directory, step)
  if 'mesh' not in saved:  # converted weights carry only the model: the rest is default
    base = default.get_config()
    base.model.update(saved['model'])
    saved = base.to_dict()
  config = ml_collections.ConfigDict(saved)
  for key, value in overrides.items():
    group, name = key.split('.', 1)
    config[group][name] = value
  return config, step


def restore_model(directory: str, step: int, config, mesh, bfloat16: bool = False):
  """The model with the checkpoint's parameters, sharded on `mesh` by the config's rules."""
  model_config = model_lib.ModelConfig.from_config(config.model)
  abstract = nnx.state(model_lib.abstract_model(model_config), nnx.Param)
  if bfloat16:  # Orbax casts while reading: half the memory, never float32 in between
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  try:
    params = checkpoint_lib.restore_params(directory, step, abstract, shardings)
  except Exception as error:  # Orbax and TensorStore raise many kinds for a damaged file
    raise UserError(f'checkpoint {directory}/{step} cannot be read ({type(error).__name__}: '
                    f'{str(error)[:200]}); it may be incomplete or damaged.') from None
  return nnx.merge(train_lib.graphdef_of(model_config), params)


def byte_lengths(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token stands for: [vocab] (0 for BOS/EOS, 1 for byte tokens)."""
  lengths = np.zeros(tokenizer.vocab_size(), np.int32)
  for i in range(tokenizer.vocab_size()):
    if tokenizer.is_byte(i):
      lengths[i] = 1
    elif not (tokenizer.is_control(i) or tokenizer.is_unknown(i)):
      lengths[i] = len(tokenizer.id_to_piece(i).replace('\u2581', ' ').encode())
  return lengths


@functools.partial(nnx.jit, static_argnums=3)
def _nll_sums(model, batch, token_bytes, loss_chunks):
  _, weight, nll = train_lib.token_losses(nnx.state(model, nnx.Param),
                                          nnx.graphdef(model), batch, 0.0, True, loss_chunks)
  return nll, weight, jnp.sum(token_bytes[batch['targets']] * batch['weights'])


def perplexity(model, batches, n_batches: int, tokenizer, loss_chunks: int) -> dict:
  """Loss (nats per token), perplexity and bits per byte over n_batches global batches."""
  token_bytes = jnp.asarray(byte_lengths(tokenizer))
  nll, weight, n_bytes = 0.0, 0.0, 0.0
  for _ in range(n_batches):
    batch_nll, batch_weight, batch_bytes = _nll_sums(model, next(batches), token_bytes,
                                                     loss_chunks)
    nll, weight, n_bytes = nll + float(batch_nll), weight + float(batch_weight), n_bytes + float(
        batch_bytes)
  loss = nll / weight
  return {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_byte': nll / math.log(2) / n_bytes,
          'tokens': int(weight)}


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
  correct = correct_norm = 0
  for index, example in enumerate(examples):
    mine = [(s, c) for s, c in zip(scores, choices) if c.example == index]
    correct += int(np.argmax([s for s, _ in mine]) == example['label'])
    correct_norm += int(np.argmax([s / c.characters for s, c in mine]) == example['label'])
  return {'accuracy': correct / len(examples), 'accuracy_norm': correct_norm / len(examples),
          'examples': len(examples)}


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
      if not {'context', 'choices', 'label'} <= set(example) or not (
          0 <= example['label'] < len(example['choices'])):
        raise UserError(f'{path}:{number} needs "context", "choices" and a "label" that '
                        'indexes the choices.')
      examples.append(example)
  return examples
