"""Tokenizers: a user's file of any of three formats, one beside a checkpoint, or one trained here.

`load` reads a sentencepiece `.model` (LLaMA 1/2), a Hugging Face `tokenizer.json` (with
tokenizer_config.json / special_tokens_map.json beside it) or Meta's tiktoken Llama 3
`tokenizer.model`, telling them apart by content; every one is a `base.Tokenizer`.
`for_data` finds the tokenizer of a run: data.tokenizer, else DIR/tokenizer/ beside a
checkpoint (a converted model ships its own there), else one trained on the data.
"""

import io
import json
import os

import jax
import sentencepiece as spm
from etils import epath

from llama_jax import processes
from llama_jax.data import mixture
from llama_jax.data.tokenizers import base, sentencepiece_model, tiktoken_model, tokenizer_json
from llama_jax.errors import UserError

# The LLaMA settings: BPE, digits split, unknown bytes as byte tokens, no normalization.
TRAINER_OPTIONS = dict(model_type='bpe', split_digits=True, byte_fallback=True,
                       normalization_rule_name='identity', remove_extra_whitespaces=False,
                       allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1,
                       eos_id=2, pad_id=-1, character_coverage=0.9999, max_sentence_length=16384,
                       input_sentence_size=300_000, shuffle_input_sentence=True,
                       num_threads=os.cpu_count() or 1, minloglevel=2)

FORMATS = ('a sentencepiece .model, a Hugging Face tokenizer.json or a Llama 3 tiktoken '
           'tokenizer.model')
# In a folder, the first of these that exists.
FOLDER_FILES = ('tokenizer.json', 'tokenizer.model')
# Read beside the tokenizer file when present; copied with it (copy_beside).
CONFIG_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja')


def _tokenizer_file(path: epath.Path) -> epath.Path:
  if not path.exists():
    raise UserError(f'tokenizer file {path} does not exist (data.tokenizer); give {FORMATS} '
                    '(or a folder holding one), or leave data.tokenizer empty to train one.')
  if not path.is_dir():
    return path
  for name in FOLDER_FILES:
    if (path / name).exists():
      return path / name
  raise UserError(f'the folder {path} holds no {" or ".join(FOLDER_FILES)} (data.tokenizer); '
                  f'give {FORMATS}.')


def _config_beside(path: epath.Path) -> dict:
  """tokenizer_config.json over special_tokens_map.json (either may be absent), and the
  chat template of chat_template.jinja where the config has none."""
  config = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    if (path.parent / name).exists():
      try:
        config.update(json.loads((path.parent / name).read_text()))
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f'{path.parent / name} is not a JSON file; fix or remove it.') from None
  if not isinstance(config.get('chat_template'), str) and (path.parent /
                                                           'chat_template.jinja').exists():
    config['chat_template'] = (path.parent / 'chat_template.jinja').read_text()
  return config


def _tokenizer_json(data: bytes, config: dict, path: epath.Path):
  """A tokenizer.json, or None if `data` is no JSON at all."""
  try:
    text = data.decode()
    json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  try:
    return tokenizer_json.TokenizerJson(text, config, str(path))
  except UserError:
    raise
  except Exception as error:  # the library raises plain Exceptions for a bad file
    raise UserError(f'{path} is JSON but not a tokenizer.json that the tokenizers library reads '
                    f'({str(error)[:200]}).') from None


def load(path: str) -> base.Tokenizer:
  """The tokenizer in `path` (local or bucket; a file, or a folder holding one), of the
  format its content shows: a sentencepiece model, a tokenizer.json or tiktoken ranks."""
  path = _tokenizer_file(epath.Path(os.path.expanduser(path)))
  data = path.read_bytes()
  config = _config_beside(path)
  tokenizer = None
  if data.lstrip().startswith(b'{'):
    tokenizer = _tokenizer_json(data, config, path)
  elif (ranks := tiktoken_model.parse_ranks(data)) is not None:
    tokenizer = tiktoken_model.TiktokenTokenizer(ranks)
  else:
    try:
      tokenizer = sentencepiece_model.SentencePieceTokenizer(data)
    except RuntimeError:  # not a sentencepiece model either
      pass
  if tokenizer is None:
    raise UserError(f'tokenizer file {path} is none of the formats known (data.tokenizer); '
                    f'give {FORMATS}.')
  if isinstance(config.get('chat_template'), str):
    tokenizer.chat_template = config['chat_template']
  return tokenizer


def train(documents, vocab_size: int, path: str) -> base.Tokenizer:
  """Trains a sentencepiece tokenizer on an iterable of documents (one sentence per line)
  into `path`."""
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


def check_vocab(tokenizer: base.Tokenizer, vocab_size: int, where: str) -> None:
  """A tokenizer may use fewer ids than the model has rows, never more."""
  if tokenizer.vocab_size > vocab_size:
    raise UserError(f'the tokenizer ({where}) has {tokenizer.vocab_size} tokens but '
                    f'model.vocab_size is {vocab_size}; set model.vocab_size to at least '
                    f'{tokenizer.vocab_size} or use a tokenizer of at most {vocab_size} tokens.')


def encode_document(tokenizer: base.Tokenizer, text: str) -> list[int]:
  """BOS, the text's tokens, EOS."""
  return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def encode_documents(tokenizer: base.Tokenizer, texts: list[str]) -> list[list[int]]:
  """`encode_document` of each text, batched."""
  return [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


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


def beside(directory: str) -> epath.Path | None:
  """DIR/tokenizer/ if it holds a tokenizer (llama_jax.convert writes one there)."""
  if not directory:
    return None
  folder = epath.Path(os.path.expanduser(directory)) / 'tokenizer'
  return folder if any((folder / name).exists() for name in FOLDER_FILES) else None


def copy_beside(source: epath.Path, workdir: str) -> epath.Path:
  """Copies the tokenizer files of the folder `source` into WORKDIR/tokenizer/ (a file
  already there must be the same)."""
  target = epath.Path(workdir) / 'tokenizer'
  names = [name for name in FOLDER_FILES + CONFIG_FILES if (source / name).exists()]
  for name in FOLDER_FILES + CONFIG_FILES:
    if (target / name).exists() and (name not in names or
                                     (target / name).read_bytes() != (source / name).read_bytes()):
      raise UserError(f'{target / name} is not the same as in {source}, the tokenizer of '
                      'checkpoint.init_params; remove it or use another --workdir.')
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
      if not (target / name).exists():
        partial = target / (name + '.partial')
        partial.write_bytes((source / name).read_bytes())
        partial.rename(target / name)
  processes.sync('tokenizer copied')
  return target


def for_data(data_config, vocab_size: int, corpus=None, checkpoints: tuple[str, ...] = ()):
  """The run's tokenizer: data.tokenizer, else DIR/tokenizer/ of the first of the
  `checkpoints` folders (a workdir, a convert output) that has one, else the one trained
  for these sources: trained now from `corpus` on process 0 if it does not exist yet, an
  error without a corpus (evaluation never trains one)."""
  found = next((folder for folder in map(beside, filter(None, checkpoints)) if folder), None)
  if data_config.tokenizer or found:
    path = data_config.tokenizer or os.fspath(found)
  else:
    path = trained_path(data_config, vocab_size)
    if not epath.Path(path).exists():
      if corpus is None:
        raise UserError(f'no tokenizer: data.tokenizer is empty, the checkpoint has no '
                        f'tokenizer/ folder and none was trained for these data at {path}; pass '
                        '--config.data.tokenizer=PATH to the tokenizer the model was trained '
                        'with.')
      if jax.process_index() == 0:
        processes.say(f'Training a {vocab_size}-token tokenizer on '
                      f'{", ".join(s.name for s in corpus.sources)} into {path}')
        train(_training_text(corpus), vocab_size, path)
      processes.sync('tokenizer trained')
  tokenizer = load(path)
  check_vocab(tokenizer, vocab_size, path)
  return tokenizer
