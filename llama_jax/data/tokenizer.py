"""SentencePiece tokenizers: a user's `tokenizer.model` (Meta's works) or one trained here."""

import io
import os

import jax
import sentencepiece as spm
from etils import epath

from llama_jax import processes
from llama_jax.data import mixture
from llama_jax.errors import UserError

# The LLaMA settings: BPE, digits split, unknown bytes as byte tokens, no normalization.
TRAINER_OPTIONS = dict(model_type='bpe', split_digits=True, byte_fallback=True,
                       normalization_rule_name='identity', remove_extra_whitespaces=False,
                       allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1,
                       eos_id=2, pad_id=-1, character_coverage=0.9999, max_sentence_length=16384,
                       input_sentence_size=300_000, shuffle_input_sentence=True,
                       num_threads=os.cpu_count() or 1, minloglevel=2)


def load(path: str) -> spm.SentencePieceProcessor:
  """Loads a .model file (local or bucket path) with a clear error if it is not one."""
  path = epath.Path(os.path.expanduser(path))
  if not path.exists():
    raise UserError(f'tokenizer file {path} does not exist (data.tokenizer); give a '
                    'sentencepiece .model file, or leave data.tokenizer empty to train one.')
  try:
    return spm.SentencePieceProcessor(model_proto=path.read_bytes())
  except RuntimeError:
    raise UserError(
        f'tokenizer file {path} is not a sentencepiece model (data.tokenizer).') from None


def train(documents, vocab_size: int, path: str) -> spm.SentencePieceProcessor:
  """Trains a tokenizer on an iterable of documents (one sentence per line) into `path`."""
  def lines():
    for document in documents:
      yield from (line for line in document.split('\n') if line.strip())

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=model,
                                   vocab_size=vocab_size, **TRAINER_OPTIONS)
  except RuntimeError as error:
    raise UserError(f'could not train a {vocab_size}-token tokenizer ({error}); '
                    'try a smaller model.vocab_size.') from None
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / (path.name + '.partial')
  partial.write_bytes(model.getvalue())
  partial.rename(path)  # never leave a half-written model under the final name
  return load(os.fspath(path))


def check_vocab(tokenizer: spm.SentencePieceProcessor, vocab_size: int, where: str) -> None:
  if tokenizer.vocab_size() != vocab_size:
    raise UserError(f'the tokenizer ({where}) has {tokenizer.vocab_size()} tokens but '
                    f'model.vocab_size is {vocab_size}; set model.vocab_size='
                    f'{tokenizer.vocab_size()} or use a matching tokenizer.')


def encode_document(tokenizer: spm.SentencePieceProcessor, text: str) -> list[int]:
  """BOS, the text's tokens, EOS."""
  return [tokenizer.bos_id()] + tokenizer.encode(text) + [tokenizer.eos_id()]


def trained_path(data_config, vocab_size: int) -> str:
  """Where the tokenizer trained for these sources and vocabulary size is cached."""
  return os.path.join(os.path.expanduser(data_config.data_dir), 'tokenizers',
                      f'{mixture.cache_name(data_config)}_{vocab_size}.model')


TRAINING_DOCUMENTS = 200_000  # from a mixture: the first documents of its stream


def _training_text(corpus):
  """A single source's train split in order; a mixture's first documents, by weight."""
  if len(corpus.sources) == 1:
    train = corpus.train[0]
    return (train[i] for i in range(len(train)))
  stream = mixture.row_documents(corpus.train, corpus.weights, row=0, batch_size=1, seed=0,
                                 shuffle=True)
  count = min(sum(len(d) for d in corpus.train), TRAINING_DOCUMENTS)
  return (stream[i][2] for i in range(count))


def for_data(data_config, vocab_size: int, corpus=None):
  """data.tokenizer, else the one trained for these sources: trained now from `corpus` on
  process 0 if it does not exist yet, an error without a corpus (evaluation never trains
  one)."""
  path = data_config.tokenizer or trained_path(data_config, vocab_size)
  if not data_config.tokenizer and not epath.Path(path).exists():
    if corpus is None:
      raise UserError(f'no tokenizer: data.tokenizer is empty and none was trained for '
                      f'these data at {path}; pass --config.data.tokenizer=PATH to the '
                      'tokenizer.model the model was trained with (converted weights ship one).')
    if jax.process_index() == 0:
      processes.say(f'Training a {vocab_size}-token tokenizer on '
                    f'{", ".join(s.name for s in corpus.sources)} into {path}')
      train(_training_text(corpus), vocab_size, path)
    processes.sync('tokenizer trained')
  tokenizer = load(path)
  check_vocab(tokenizer, vocab_size, path)
  return tokenizer
