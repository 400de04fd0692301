"""Text generation with the key/value cache: prefill the prompts, then one token at a time.

Prompts of different lengths are left-padded: padding gets segment id 0 (invisible to
every real token) and each row's positions start at 0 at its first real token. The
whole decode loop is one jitted `lax.while_loop`, compiled once per batch shape.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def sample(logits, rng, sampling: Sampling):
  """Next tokens [batch] from float32 logits [batch, vocab]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest set of tokens whose probability reaches top_p (always at least one).
    cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def left_pad(prompts: list[list[int]], pad_id: int = 0):
  """tokens, segment_ids, positions: [batch, longest prompt rounded up to a multiple of 64
  (few shapes, few compilations)], padding on the left."""
  length = 64 * -(-max(len(p) for p in prompts) // 64)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    segment_ids[row, length - len(prompt):] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return tokens, segment_ids, positions


@functools.partial(jax.jit, static_argnames=('graphdef', 'sampling'))
def _generate(params, tokens, segment_ids, positions, stop_ids, rng, *, graphdef, sampling):
  """stop_ids: [stops] ids that end a row (its later tokens repeat stop_ids[0])."""
  model = nnx.merge(graphdef, params)
  batch, prompt_len = tokens.shape
  cache = model_lib.KVCache.zeros(model.config, batch, prompt_len + sampling.max_new_tokens)
  logits, cache = model(tokens, positions, segment_ids, cache=cache)
  rng, step_rng = jax.random.split(rng)
  first = sample(logits[:, -1], step_rng, sampling)
  output = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32).at[:, 0].set(first)

  def stops(token):  # [batch] -> [batch] bool
    return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)

  def keep_going(carry):
    i, _, _, _, done, _, _ = carry
    return (i < sampling.max_new_tokens) & ~jnp.all(done)

  def decode_one(carry):
    i, token, position, cache, done, output, rng = carry
    logits, cache = model(token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32),
                          cache=cache)
    rng, step_rng = jax.random.split(rng)
    next_token = sample(logits[:, 0], step_rng, sampling)
    next_token = jnp.where(done, stop_ids[0], next_token)
    return (i + 1, next_token, position + 1, cache, done | stops(next_token),
            output.at[:, i].set(next_token), rng)

  carry = (jnp.int32(1), first, positions[:, -1] + 1, cache, stops(first), output, rng)
  return jax.lax.while_loop(keep_going, decode_one, carry)[5]


def generate(model, prompts: list[list[int]], sampling: Sampling, stop_ids, seed: int = 0):
  """New tokens for each prompt (token ids), up to and without the first of `stop_ids` (a
  collection of ids: the tokenizer's stop_ids)."""
  stop_ids = sorted(set(stop_ids))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens, segment_ids, positions = left_pad(prompts)
  output = _generate(params, tokens, segment_ids, positions, jnp.asarray(stop_ids, jnp.int32),
                     jax.random.key(seed), graphdef=graphdef, sampling=sampling)
  results = []
  for row in np.asarray(output).tolist():
    end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
    results.append(row[:end])
  return results
