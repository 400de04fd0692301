"""Packed, shuffled, per-host and resumable batches of token sequences, built with grain.

The global batch has `batch_size` rows. Row r is its own stream: documents r, r + B,
r + 2B, ... of the shuffled (and every epoch reshuffled) document order, each tokenized
as BOS ... EOS, concatenated and cut into sequences of seq_len + 1 tokens. A host loads
only its own rows, so the global batch at step k is the same on 1 host or 64, and
resuming needs only each row's small position (the grain iterator state).
"""

import grain
import numpy as np

from llama_jax import sharding as sharding_lib
from llama_jax.data import tokenizer as tokenizer_lib


def _row_stream(documents, tokenizer, row, batch_size, seq_len):
  """[seq_len + 1] token sequences of one batch row, with segment ids and positions."""
  tokenized = documents[row::batch_size].map(
      lambda text: {'tokens': np.asarray(tokenizer_lib.encode_document(tokenizer, text), np.int32)})
  # Rows read synchronously: one background thread prefetches whole batches instead.
  rows = tokenized.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return grain.experimental.ConcatThenSplitIterDataset(rows, length_struct={'tokens': seq_len + 1})


def _to_batch(rows):
  """Stacks packed rows into the model's batch: inputs and targets shifted by one."""
  tokens = np.stack([r['tokens'] for r in rows])  # [rows, seq_len + 1]
  segments = np.stack([r['tokens_segment_ids'] for r in rows])
  positions = np.stack([r['tokens_positions'] for r in rows])
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1],
      # A target is learned only inside its input's document (never across a boundary).
      'weights': (segments[:, 1:] == segments[:, :-1]).astype(np.float32),
  }


def batches(source, *, text_feature, tokenizer, batch_size, rows, seq_len, seed, shuffle=True,
            prefetch=4) -> grain.IterDataset:
  """Batches of rows `rows` (this host's share) of a `batch_size`-row global batch.

  source: random-access documents (a TFDS data source). Each batch is a dict of
  [len(rows), seq_len] arrays: inputs, targets, segment_ids, positions, weights.
  """
  documents = grain.MapDataset.source(source).map(
      lambda example: example[text_feature].decode('utf-8', errors='replace')
      if isinstance(example[text_feature], bytes) else example[text_feature])
  if shuffle:
    documents = documents.shuffle(seed=seed)
  documents = documents.repeat()  # a new shuffle every epoch
  streams = [_row_stream(documents, tokenizer, row, batch_size, seq_len) for row in rows]
  dataset = grain.experimental.ZipIterDataset(streams).map(_to_batch)
  if prefetch:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
  return dataset


def host_batches(config, source, tokenizer, rows: range, shuffle: bool) -> grain.IterDataset:
  """This process's rows of the global batches of `source`, as `config` sets them up."""
  return batches(source, text_feature=config.data.text_feature, tokenizer=tokenizer,
                 batch_size=config.train.batch_size, rows=rows, seq_len=config.train.seq_len,
                 seed=config.train.seed, shuffle=shuffle, prefetch=config.data.prefetch)


def global_batches(host_iterator, batch_sharding, batch_size: int, rows: range):
  """Global jax.Array batches assembled from every process's rows."""
  for host_batch in host_iterator:
    yield sharding_lib.global_batch(host_batch, batch_sharding, batch_size, rows)


def row_states(iterator) -> list:
  """The resume position of each of this host's rows (JSON-serializable)."""
  return iterator.get_state()['parents']


def set_row_states(iterator, states: list) -> None:
  """Rewinds an iterator of `batches` to the given per-row positions."""
  iterator.set_state({'parents': states})
