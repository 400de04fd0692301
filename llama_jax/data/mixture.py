"""The sources a run reads, with their sampling weights (the LLaMA paper's data recipe).

`data.mixture` maps a source's name to its `dataset` (see sources.py) and `weight`:

    data.mixture = {'c4': {'dataset': 'prepared:c4', 'weight': 15.0}, ...}

and optionally its `format` (text | messages | prompt_completion, default text: see
pipeline.py). Empty, the run reads `data.name` alone (of `data.format`), as a source named
after it. Weights are relative
(they need not add up to 1 or 100). Source names appear in the logs as `eval_loss/NAME`.
"""

import dataclasses

import grain
import jax

from llama_jax import processes
from llama_jax.data import sources
from llama_jax.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # as the logs call it
  dataset: str  # builtin_text, a TFDS name, or prepared:FOLDER
  weight: float  # relative sampling weight
  format: str = 'text'  # text | messages | prompt_completion (pipeline.FORMATS)


def sources_of(data_config) -> list[Source]:
  """The configured sources, in order, each checked."""
  if not data_config.mixture:
    return [Source(data_config.name, data_config.name, 1.0, data_config.format)]
  found = []
  for name, source in data_config.mixture.items():
    if not {'dataset', 'weight'} <= set(source.keys()) <= {'dataset', 'weight', 'format'}:
      raise ConfigError(f'data.mixture.{name} must give a dataset, a weight and optionally a '
                        f'format, not {", ".join(sorted(source.keys()))}.')
    weight = source['weight']
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise ConfigError(f'data.mixture.{name}.weight is {weight!r}; give a positive number '
                        '(weights are relative).')
    found.append(Source(name, str(source['dataset']), float(weight), source.get('format', 'text')))
  return found


@dataclasses.dataclass
class Corpus:
  """The sources and their documents (grain MapDatasets of str), split by split."""
  sources: list[Source]
  train: list[grain.MapDataset]
  eval: list[grain.MapDataset | None]  # None: a source with no held-out documents

  @property
  def weights(self) -> list[float]:
    return [source.weight for source in self.sources]


def open_corpus(data_config, validation: bool = True) -> Corpus:
  """Every source's train documents and (with `validation`) eval documents; process 0
  prepares what needs preparing while the other processes wait."""
  found = sources_of(data_config)
  if jax.process_index() == 0:
    for source in found:
      sources.prepare_dataset(source.dataset, data_config)
  processes.sync('datasets prepared')
  train, held_out = [], []
  for source in found:
    train.append(sources.documents(source.dataset, data_config, data_config.train_split))
    if not len(train[-1]):
      raise UserError(f'source {source.name} ({source.dataset}) has no documents in its '
                      f'{data_config.train_split} split; prepare it from a non-empty corpus.')
    held_out.append(
        sources.documents(source.dataset, data_config, data_config.eval_split
                         ) if validation else None)
    if validation and not len(held_out[-1]):
      processes.say(f'warning: source {source.name} has no {data_config.eval_split} documents; '
                    'it is left out of validation.')
      held_out[-1] = None
  if validation and not any(d is not None for d in held_out):
    raise UserError(f'no source has documents in its {data_config.eval_split} split to '
                    'validate on; give data.eval_split a split with documents, or set '
                    'train.eval_every=0.')
  return Corpus(found, train, held_out)


def cache_name(data_config) -> str:
  """A name for what these sources make together (a tokenizer trained on them)."""
  return '+'.join(sources.cache_name(s.dataset, data_config) for s in sources_of(data_config))


def row_documents(documents: list[grain.MapDataset], weights, *, row: int, batch_size: int,
                  seed: int, shuffle: bool) -> grain.MapDataset:
  """Row `row`'s endless stream of (source index, position, text) documents.

  Each source is shuffled (anew every epoch) and repeated; the row takes its documents
  row, row + batch_size, ... of it, so rows never share a document and a row's stream
  does not depend on how many hosts load the batch. The rows' shares of the sources are
  then interleaved in proportion to the weights (grain's deterministic mix). `position`
  counts over the repeats: position // len(source) is the epoch it belongs to.
  """
  streams = []
  for index, source in enumerate(documents):
    if shuffle:
      source = source.shuffle(seed=seed)
    source = source.repeat().map_with_index(lambda position, text, k=index: (k, position, text))
    streams.append(source[row::batch_size])
  return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
