"""Log-likelihoods of continuations, batched: the scorer of our multiple-choice tasks and of
the lm-evaluation-harness adapter."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def _continuation_scores(model, tokens, weights):
  """Per row: sum over positions of weights * log p(token[t+1] | tokens[:t+1]), and whether
  every weighted token is the most likely one. tokens, weights: [rows, length]."""
  logits, _ = model(tokens[:, :-1])  # [rows, length - 1, vocab]
  logp = jax.nn.log_softmax(logits, axis=-1)
  targets, scored = tokens[:, 1:], weights[:, 1:] > 0
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~scored, axis=-1)
  return jnp.sum(target_logp * weights[:, 1:], axis=-1), greedy


def score_continuations(model, sequences: list[tuple[list[int], int]],
                        batch_size: int = 16) -> list[tuple[float, bool]]:
  """(log-likelihood, greedy) of tokens[start:] given tokens[:start], for each (tokens,
  start); sequences of similar length are batched together, padded so that few shapes are
  compiled. A sequence may be model.max_seq_len + 1 tokens long. Results come back in the
  order given."""
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
  results = [None] * len(sequences)
  for first in range(0, len(order), batch_size):
    chunk = order[first:first + batch_size]
    # The last token is only a target: inputs are length - 1 long, a multiple of 64.
    length = min(64 * -(-(max(len(sequences[i][0]) for i in chunk) - 1) // 64) + 1,
                 model.config.max_seq_len + 1)
    tokens = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for row, index in enumerate(chunk):
      sequence, start = sequences[index]
      tokens[row, :len(sequence)] = sequence
      weights[row, start:len(sequence)] = 1.0
    scores, greedy = jax.device_get(_continuation_scores(model, tokens, weights))
    for row, index in enumerate(chunk):
      results[index] = (float(scores[row]), bool(greedy[row]))
  return results


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
  """BOS + context + continuation tokens, and where the continuation's tokens start
  (tokenized together where that keeps the context's tokens, as sentencepiece may merge
  across the boundary)."""
  context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
  joint = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
  if joint[:len(context_ids)] == context_ids and len(joint) > len(context_ids):
    return joint, len(context_ids)
  return context_ids + tokenizer.encode(continuation), len(context_ids)
