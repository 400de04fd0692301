"""A sentencepiece `.model` (LLaMA 1 and 2's, or one trained here)."""

import os

import numpy as np
import sentencepiece as spm

from llama_jax.data.tokenizers import base


class SentencePieceTokenizer(base.Tokenizer):
  def __init__(self, model_proto: bytes):
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)  # RuntimeError if not one
    self.vocab_size = self.processor.vocab_size()
    self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
    self.stop_ids = frozenset([self.eos_id])
    self.special_tokens = {
        self.processor.id_to_piece(i): i
        for i in range(self.vocab_size)
        if self.processor.is_control(i) or self.processor.is_unknown(i)
    }

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def encode_batch(self, texts):
    return self.processor.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self.processor.decode(list(ids))  # control tokens (BOS, EOS) decode to nothing

  def token_bytes(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.processor.is_byte(i):
        lengths[i] = 1
      elif not (self.processor.is_control(i) or self.processor.is_unknown(i)):
        lengths[i] = len(self.processor.id_to_piece(i).replace('\u2581', ' ').encode())
    return lengths
