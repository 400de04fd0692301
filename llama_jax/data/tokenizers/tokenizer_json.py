"""A Hugging Face `tokenizer.json` (Llama 3's, Llama 2's, ...) through the `tokenizers` library.

BOS and EOS come from tokenizer_config.json (or special_tokens_map.json) beside the file,
else from the Llama names among its special tokens. Encoding never adds what the file's
post-processor would (Llama 3's prepends <|begin_of_text|>): the pipeline adds one BOS
itself.
"""

import json

import numpy as np
import tokenizers

from llama_jax.data.tokenizers import base
from llama_jax.errors import UserError

# (BOS, EOS) names where no config file says: Llama 3's, then Llama 1/2's.
KNOWN_BOS_EOS = (('<|begin_of_text|>', '<|end_of_text|>'), ('<s>', '</s>'))
# Llama 3's tokens that end a reply (end of turn, end of message, end of text).
LLAMA3_STOPS = ('<|eot_id|>', '<|eom_id|>', '<|end_of_text|>')


def _token_name(value) -> str | None:
  """A config's token entry: a string, or an AddedToken dict with its `content`."""
  return value.get('content') if isinstance(value, dict) else value


def _byte_level(component) -> bool:
  """Whether a tokenizer.json component (a decoder) is or holds ByteLevel."""
  if not component:
    return False
  return component.get('type') == 'ByteLevel' or any(
      _byte_level(part) for part in component.get('decoders', ()))


def _bytes_to_unicode() -> dict[str, int]:
  """GPT-2's byte-level alphabet, inverted: the character standing for each byte -> byte.
  Printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ..."""
  printable = set(range(ord('!'),
                        ord('~') + 1)) | set(range(ord('¡'),
                                                   ord('¬') + 1)) | set(
                                                       range(ord('®'),
                                                             ord('ÿ') + 1))
  others = [b for b in range(256) if b not in printable]
  return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class TokenizerJson(base.Tokenizer):
  def __init__(self, text: str, config: dict, path: str):
    """text: the tokenizer.json; config: tokenizer_config.json over special_tokens_map.json."""
    self.tokenizer = tokenizers.Tokenizer.from_str(text)
    self.tokenizer.encode_special_tokens = True  # '<|eot_id|>' in a document is plain text
    self.byte_level = _byte_level(json.loads(text).get('decoder'))
    vocab = self.tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    self.special_tokens = {
        token.content: i
        for i, token in self.tokenizer.get_added_tokens_decoder().items()
        if token.special
    }
    names = (_token_name(config.get('bos_token')), _token_name(config.get('eos_token')))
    if None in names:
      names = next((pair for pair in KNOWN_BOS_EOS if set(pair) <= vocab.keys()), names)
    if None in names or not set(names) <= vocab.keys():
      raise UserError(f'{path} names no BOS and EOS token that it holds; put "bos_token" and '
                      '"eos_token" into a tokenizer_config.json beside it.')
    self.bos_id, self.eos_id = vocab[names[0]], vocab[names[1]]
    self.stop_ids = frozenset(
        [self.eos_id] + [self.special_tokens[t] for t in LLAMA3_STOPS if t in self.special_tokens])

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts):
    encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    """Byte-level vocabularies: one character per byte; sentencepiece-style ones: '▁' is a
    space and <0xNN> one byte."""
    lengths = np.zeros(self.vocab_size, np.int32)
    byte_of = _bytes_to_unicode()
    special = set(self.special_tokens.values())
    for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
      if i in special:
        continue
      if self.byte_level:
        lengths[i] = sum(1 if c in byte_of else len(c.encode()) for c in token)
      elif len(token) == 6 and token.startswith('<0x') and token.endswith('>'):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace('\u2581', ' ').encode())
    return lengths
