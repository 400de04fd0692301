"""Packed, shuffled, per-host and resumable batches of token sequences, built with grain.

The global batch has `batch_size` rows. Row r is its own stream of documents, drawn from
the sources in proportion to their weights (mixture.row_documents: of each source, the
documents r, r + B, r + 2B, ... of its shuffled, every epoch reshuffled order), each
tokenized as BOS ... EOS, concatenated and cut into sequences of seq_len + 1 tokens. A host
loads only its own rows, so the global batch at step k is the same on 1 host or 64, and
resuming needs only each row's small position (the grain iterator state).
"""

import threading

import grain
import numpy as np

from llama_jax import sharding as sharding_lib
from llama_jax.data import mixture
from llama_jax.data import tokenizer as tokenizer_lib


class Progress:
  """How far the loader has read into each source: its epochs, as of the documents read."""
  def __init__(self, lengths: list[int]):
    self.lengths = lengths
    self.furthest = [-1] * len(lengths)  # the furthest position read per source
    self._lock = threading.Lock()

  def read(self, source: int, position: int) -> None:
    with self._lock:
      self.furthest[source] = max(self.furthest[source], position)

  def epochs(self) -> list[float]:
    """Epochs read per source: 1.5 is halfway through the second pass."""
    return [(furthest + 1) / length for furthest, length in zip(self.furthest, self.lengths)]


class _TokenizedDocuments(grain.MapDataset):
  """BOS + tokens + EOS of each document of a row's stream, tokenized `block` documents at
  a time (the tokenizer's batched, multi-threaded path); the row reads them in order."""
  def __init__(self, parent: grain.MapDataset, tokenizer, progress, block: int = 32):
    super().__init__(parent)
    self.tokenizer, self.progress, self.block = tokenizer, progress, block
    self._cached = (-1, [])  # (block number, its (source, position, tokens [length]))

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index: int):
    number, offset = divmod(index, self.block)
    if self._cached[0] != number:
      start = number * self.block
      documents = [self._parent[i] for i in range(start, min(start + self.block, len(self)))]
      tokens = tokenizer_lib.encode_documents(self.tokenizer, [text for _, _, text in documents])
      self._cached = (number, [(source, position, np.asarray(ids, np.int32))
                               for (source, position, _), ids in zip(documents, tokens)])
    source, position, tokens = self._cached[1][offset]
    if self.progress is not None:
      self.progress.read(source, position)
    return {'tokens': tokens}


def _row_stream(documents, weights, tokenizer, row, batch_size, seq_len, seed, shuffle, progress):
  """[seq_len + 1] token sequences of one batch row, with segment ids and positions."""
  stream = mixture.row_documents(documents, weights, row=row, batch_size=batch_size, seed=seed,
                                 shuffle=shuffle)
  # Rows read synchronously: one background thread prefetches whole batches instead.
  rows = _TokenizedDocuments(stream, tokenizer, progress).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
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


def batches(documents: list, weights, *, tokenizer, batch_size, rows, seq_len, seed, shuffle=True,
            prefetch=4, progress: Progress | None = None) -> grain.IterDataset:
  """Batches of rows `rows` (this host's share) of a `batch_size`-row global batch.

  documents: one random-access MapDataset of str per source; weights: theirs. Each batch
  is a dict of [len(rows), seq_len] arrays: inputs, targets, segment_ids, positions,
  weights. `progress`, if given, follows how far the sources have been read.
  """
  streams = [
      _row_stream(documents, weights, tokenizer, row, batch_size, seq_len, seed, shuffle, progress)
      for row in rows
  ]
  dataset = grain.experimental.ZipIterDataset(streams).map(_to_batch)
  if prefetch:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
  return dataset


def host_batches(config, documents: list, weights, tokenizer, rows: range, shuffle: bool,
                 progress: Progress | None = None) -> grain.IterDataset:
  """This process's rows of the global batches of `documents`, as `config` sets them up."""
  return batches(documents, weights, tokenizer=tokenizer, batch_size=config.train.batch_size,
                 rows=rows, seq_len=config.train.seq_len, seed=config.train.seed, shuffle=shuffle,
                 prefetch=config.data.prefetch, progress=progress)


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
