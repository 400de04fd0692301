"""A Hugging Face `tokenizer.json` (Llama 3's, Llama 2's, ...) through the `tokenizers` library.

BOS and EOS come from tokenizer_config.json (or special_tokens_map.json) beside the file,
else from the Llama names among its special tokens. Encoding never adds what the file's
post-processor would (Llama 3's prepends <|begin_of_text|>): the pipeline adds one BOS
itself. A file that is tiktoken ranks written out as BPE merges, as Llama 3's is (made from
Meta's tiktoken file), is encoded by tiktoken (`tiktoken_ranks`).
"""

import json
import os

import numpy as np
import tiktoken
import tokenizers

from llama_jax.data.tokenizers import base, tiktoken_model
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


def _is_llama3_pre_tokenizer(pre_tokenizer) -> bool:
  """Llama 3's split pattern, each piece alone, then bytes as characters."""
  parts = pre_tokenizer.get('pretokenizers', ()) if pre_tokenizer else ()
  if len(parts) != 2:
    return False
  split, byte_level = parts
  return (split.get('type') == 'Split' and split.get('pattern') == {
      'Regex': tiktoken_model.PATTERN
  } and split.get('behavior') == 'Isolated' and not split.get('invert') and
          byte_level.get('type') == 'ByteLevel' and not byte_level.get('add_prefix_space') and
          byte_level.get('use_regex') is False)


def tiktoken_ranks(spec: dict) -> dict[bytes, int] | None:
  """{token bytes: id} if the tokenizer.json `spec` encodes as tiktoken does with these ranks,
  else None. It does when the file is tiktoken ranks written as BPE (Llama 3's tokenizer.json,
  transformers' TikTokenConverter): Llama 3's pre-tokenizer, no normalizer, a piece that is a
  token taken whole (ignore_merges), every 256 bytes a token, and as merges every split of
  every token into two tokens, in the order of the merged token's id, so that both merge the
  pair whose merged token has the lowest id (they could part only where two overlapping pairs
  make the same token, as 'ab'+'a' and 'a'+'ba' do: tiktoken, Meta's own encoder for such a
  file, is the reference there). tiktoken encodes about 4x faster (docs/tokenizers.md)."""
  model = spec.get('model') or {}
  if (spec.get('normalizer') or model.get('type') != 'BPE' or not model.get('ignore_merges') or
      model.get('dropout') or model.get('continuing_subword_prefix') or
      model.get('end_of_word_suffix') or model.get('byte_fallback') or
      not _is_llama3_pre_tokenizer(spec.get('pre_tokenizer')) or
      not all(token.get('special') for token in spec.get('added_tokens', ()))):
    return None
  vocab, byte_of = model['vocab'], _bytes_to_unicode()
  if not all(c in byte_of for token in vocab for c in token):
    return None
  ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}
  if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
    return None
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  merged_ids = [vocab.get(left + right, -1) for left, right in merges]
  if (any(left not in vocab or right not in vocab for left, right in merges) or -1 in merged_ids or
      any(a > b for a, b in zip(merged_ids, merged_ids[1:])) or len(set(merges)) != len(merges)):
    return None
  splits = sum(
      token[:i] in vocab and token[i:] in vocab for token in vocab for i in range(1, len(token)))
  return ranks if splits == len(merges) else None


class TokenizerJson(base.Tokenizer):
  def __init__(self, text: str, config: dict, path: str):
    """text: the tokenizer.json; config: tokenizer_config.json over special_tokens_map.json."""
    spec = json.loads(text)
    self.tokenizer = tokenizers.Tokenizer.from_str(text)
    self.tokenizer.encode_special_tokens = True  # '<|eot_id|>' in a document is plain text
    self.byte_level = _byte_level(spec.get('decoder'))
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
    ranks = tiktoken_ranks(spec)
    self.tiktoken = ranks and tiktoken.Encoding('tokenizer.json', pat_str=tiktoken_model.PATTERN,
                                                mergeable_ranks=ranks, special_tokens={})

  def encode(self, text: str) -> list[int]:
    if self.tiktoken:
      return self.tiktoken.encode_ordinary(text)
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts):
    if self.tiktoken:
      return self.tiktoken.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)
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
