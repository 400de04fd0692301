"""Packed, shuffled, per-host and resumable batches of token sequences, built with grain.

The global batch has `batch_size` rows. Row r is its own stream of documents, drawn from
the sources in proportion to their weights (mixture.row_documents: of each source, the
documents r, r + B, r + 2B, ... of its shuffled, every epoch reshuffled order), each
tokenized as BOS ... EOS, concatenated and cut into sequences of seq_len + 1 tokens. A host
loads only its own rows, so the global batch at step k is the same on 1 host or 64, and
resuming needs only each row's small position (the grain iterator state).

A conversation source (format messages | prompt_completion, one JSON record a document) is
rendered through the chat template instead (chat.render), its tokens weighted 1 on what the
assistant says. When any source is one, rows are packed first-fit with whole documents
(padding the rest; a text document longer than a row is cut into row-long pieces), so a
conversation is never split; one longer than a row is truncated or dropped (data.overlong).
"""

import json
import threading

import grain
import numpy as np

from llama_jax import sharding as sharding_lib
from llama_jax.data import chat
from llama_jax.data import mixture
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

FORMATS = ('text', 'messages', 'prompt_completion')
OVERLONG = ('truncate', 'drop')


class Progress:
  """How far the loader has read into each source: its epochs, as of the documents read."""
  def __init__(self, lengths: list[int]):
    self.lengths = lengths
    self.furthest = [-1] * len(lengths)  # the furthest position read per source
    self.overlong = [0] * len(lengths)  # conversations longer than a row, truncated or dropped
    self._lock = threading.Lock()

  def read(self, source: int, position: int) -> None:
    with self._lock:
      self.furthest[source] = max(self.furthest[source], position)

  def too_long(self, source: int) -> None:
    with self._lock:
      self.overlong[source] += 1

  def epochs(self) -> list[float]:
    """Epochs read per source: 1.5 is halfway through the second pass."""
    return [(furthest + 1) / length for furthest, length in zip(self.furthest, self.lengths)]


def _messages(record, form: str):
  """The messages of one conversation record of format `form`."""
  if form == 'messages':
    if not isinstance(record, dict) or 'messages' not in record:
      raise UserError(f'a record has no "messages" list, got {record!r:.80}.')
    return record['messages']
  if not isinstance(record, dict) or not all(
      isinstance(record.get(key), str) for key in ('prompt', 'completion')):
    raise UserError(f'a record needs string "prompt" and "completion" fields, got {record!r:.80}.')
  return [{
      'role': 'user',
      'content': record['prompt']
  }, {
      'role': 'assistant',
      'content': record['completion']
  }]


class Format:
  """How a row turns its sources' documents into tokens and loss weights."""
  def __init__(self, names: list[str], formats: list[str], chat_template: str = '',
               overlong: str = 'truncate'):
    for name, form in zip(names, formats):
      if form not in FORMATS:
        raise UserError(f'source {name} has data format {form!r}; use one of {", ".join(FORMATS)}.')
    if overlong not in OVERLONG:
      raise UserError(f'data.overlong is {overlong!r}; use truncate or drop.')
    self.names, self.formats = names, formats
    self.chat_template, self.overlong = chat_template, overlong

  @property
  def conversations(self) -> bool:
    return any(form != 'text' for form in self.formats)

  def conversation(self, tokenizer, source: int, text: str, length: int):
    """(ids, weights, overlong) of one conversation document, cut to `length` tokens (or
    empty: dropped) when it is longer."""
    try:
      record = json.loads(text)
      ids, weights = chat.render(tokenizer, _messages(record, self.formats[source]),
                                 template_name=self.chat_template)
    except json.JSONDecodeError:
      raise UserError(f'source {self.names[source]} ({self.formats[source]}) has a document that '
                      f'is not JSON: {text!r:.80}; prepare it with --format.') from None
    except UserError as error:
      raise UserError(f'source {self.names[source]}: {error}') from None
    if len(ids) <= length:
      return ids, weights, False
    if self.overlong == 'drop' or not any(weights[1:length]):  # nothing left to learn
      return [], [], True
    return ids[:length], weights[:length], True


class _TokenizedDocuments(grain.MapDataset):
  """Tokens and loss weights of each document of a row's stream, text tokenized `block`
  documents at a time (the tokenizer's batched, multi-threaded path) as BOS ... EOS with
  weight 1, conversations through the chat template; the row reads them in order. A dropped
  conversation is an empty document."""
  def __init__(self, parent: grain.MapDataset, tokenizer, progress, form: Format, length: int,
               block: int = 32):
    super().__init__(parent)
    self.tokenizer, self.progress, self.block = tokenizer, progress, block
    self.form, self.length = form, length
    self._cached = (-1, [])  # (block number, its (source, position, tokens, weights, overlong))

  def __len__(self) -> int:
    return len(self._parent)

  def _tokenize(self, documents):
    text = [i for i, (source, _, _) in enumerate(documents) if self.form.formats[source] == 'text']
    encoded = tokenizer_lib.encode_documents(self.tokenizer,
                                             [documents[i][2] for i in text]) if text else []
    tokens = dict(zip(text, encoded))
    out = []
    for i, (source, position, document) in enumerate(documents):
      if i in tokens:
        ids, weights = tokens[i], [1] * len(tokens[i])
      else:
        ids, weights, overlong = self.form.conversation(self.tokenizer, source, document,
                                                        self.length)
      out.append(
          (source, position, np.asarray(ids, np.int32), np.asarray(weights,
                                                                   np.float32), i not in tokens and
           overlong))
    return out

  def __getitem__(self, index: int):
    number, offset = divmod(index, self.block)
    if self._cached[0] != number:
      start = number * self.block
      documents = [self._parent[i] for i in range(start, min(start + self.block, len(self)))]
      self._cached = (number, self._tokenize(documents))
    source, position, tokens, weights, overlong = self._cached[1][offset]
    if self.progress is not None:
      self.progress.read(source, position)
      if overlong:
        self.progress.too_long(source)
    return {'tokens': tokens, 'loss_weights': weights}


class _Pieces(grain.experimental.FlatMapTransform):
  """A document cut into pieces of at most `length` tokens (none if it is empty)."""
  max_fan_out = 1 << 20

  def __init__(self, length: int):
    self.length = length

  def flat_map(self, document):
    return [{
        key: value[start:start + self.length] for key, value in document.items()
    } for start in range(0, len(document['tokens']), self.length)]


def _row_stream(documents, weights, tokenizer, row, batch_size, seq_len, seed, shuffle, progress,
                form: Format):
  """[seq_len + 1] token sequences of one batch row, with segment ids and positions."""
  stream = mixture.row_documents(documents, weights, row=row, batch_size=batch_size, seed=seed,
                                 shuffle=shuffle)
  # Rows read synchronously: one background thread prefetches whole batches instead.
  rows = _TokenizedDocuments(stream, tokenizer, progress, form, seq_len + 1).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  lengths = {'tokens': seq_len + 1, 'loss_weights': seq_len + 1}
  if not form.conversations:
    return grain.experimental.ConcatThenSplitIterDataset(rows, length_struct=lengths)
  rows = grain.experimental.FlatMapIterDataset(rows, _Pieces(seq_len + 1))
  return grain.experimental.FirstFitPackIterDataset(rows, length_struct=lengths, num_packing_bins=1,
                                                    shuffle_bins=False)


def _to_batch(rows):
  """Stacks packed rows into the model's batch: inputs and targets shifted by one."""
  tokens = np.stack([r['tokens'] for r in rows])  # [rows, seq_len + 1]
  segments = np.stack([r['tokens_segment_ids'] for r in rows])
  positions = np.stack([r['tokens_positions'] for r in rows])
  loss_weights = np.stack([r['loss_weights'] for r in rows])  # 0 on padding, prompts
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1],
      # A target is learned only inside its input's document (never across a boundary),
      # and only where its own weight says so (what an assistant says, in a conversation).
      'weights': (segments[:, 1:] == segments[:, :-1]) * loss_weights[:, 1:],
  }


def batches(documents: list, weights, *, tokenizer, batch_size, rows, seq_len, seed, shuffle=True,
            prefetch=4, progress: Progress | None = None,
            form: Format | None = None) -> grain.IterDataset:
  """Batches of rows `rows` (this host's share) of a `batch_size`-row global batch.

  documents: one random-access MapDataset of str per source; weights: theirs. Each batch
  is a dict of [len(rows), seq_len] arrays: inputs, targets, segment_ids, positions,
  weights. `progress`, if given, follows how far the sources have been read. `form`: the
  sources' formats (default: all text).
  """
  form = form or Format([str(i) for i in range(len(documents))], ['text'] * len(documents))
  streams = [
      _row_stream(documents, weights, tokenizer, row, batch_size, seq_len, seed, shuffle, progress,
                  form) for row in rows
  ]
  dataset = grain.experimental.ZipIterDataset(streams).map(_to_batch)
  if prefetch:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
  return dataset


def host_batches(config, documents: list, weights, tokenizer, rows: range, shuffle: bool,
                 progress: Progress | None = None,
                 sources: list | None = None) -> grain.IterDataset:
  """This process's rows of the global batches of `documents` (of `sources`, the
  mixture.Source of each; default text), as `config` sets them up."""
  form = Format([s.name for s in sources], [s.format for s in sources], config.data.chat_template,
                config.data.overlong) if sources else None
  return batches(documents, weights, tokenizer=tokenizer, batch_size=config.train.batch_size,
                 rows=rows, seq_len=config.train.seq_len, seed=config.train.seed, shuffle=shuffle,
                 prefetch=config.data.prefetch, progress=progress, form=form)


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
