"""Meta's Llama 3 `tokenizer.model`: tiktoken BPE ranks (one "base64-token rank" line each).

The split pattern and the 256 special tokens after the ranks are those of Meta's
tokenizer.py for Llama 3.1 and later (ids 128000-128255 of Llama 3's 128,256: the names
that matter, <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>
and <|eot_id|>, have the same ids in Llama 3.0). The file is read here: tiktoken never
fetches anything.
"""

import base64
import binascii
import os

import numpy as np
import tiktoken

from llama_jax.data.tokenizers import base

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED_SPECIAL_TOKENS = ('<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                        '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
                        '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>',
                        '<|python_tag|>')
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + tuple(
    f'<|reserved_special_token_{2 + i}|>' for i in range(256 - len(NAMED_SPECIAL_TOKENS)))
STOP_TOKENS = ('<|end_of_text|>', '<|eom_id|>', '<|eot_id|>')


def parse_ranks(data: bytes) -> dict[bytes, int] | None:
  """{token bytes: rank} of a tiktoken file, None if `data` is not one."""
  ranks = {}
  try:
    for line in data.splitlines():
      if line:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
  except (ValueError, binascii.Error):
    return None
  return ranks or None


class TiktokenTokenizer(base.Tokenizer):
  def __init__(self, ranks: dict[bytes, int]):
    first_special = len(ranks)
    self.special_tokens = {token: first_special + i for i, token in enumerate(SPECIAL_TOKENS)}
    self.encoding = tiktoken.Encoding('llama3', pat_str=PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
    self.vocab_size = first_special + len(SPECIAL_TOKENS)
    self.bos_id = self.special_tokens['<|begin_of_text|>']
    self.eos_id = self.special_tokens['<|end_of_text|>']
    self.stop_ids = frozenset(self.special_tokens[token] for token in STOP_TOKENS)
    self._ranks = ranks

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts):
    # Ordinary: special-token strings in the text are encoded as the text they are.
    return self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self.encoding.decode(list(ids))

  def token_bytes(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    for token, rank in self._ranks.items():
      lengths[rank] = len(token)
    return lengths
