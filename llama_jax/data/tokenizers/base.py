"""What every tokenizer offers the rest of the code, whatever its file format."""

import abc

import numpy as np


class Tokenizer(abc.ABC):
  """Ids and text both ways; ids that start and end documents and end generation.

  Attributes: vocab_size (ids it can produce), bos_id, eos_id, stop_ids (ids that end
  generation), special_tokens ({string: id}), chat_template (Jinja text or None).
  """
  vocab_size: int
  bos_id: int
  eos_id: int
  stop_ids: frozenset[int]
  special_tokens: dict[str, int]
  chat_template: str | None = None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The text's ids, no BOS/EOS added; special-token strings in it stay plain text."""

  @abc.abstractmethod
  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, on every core."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """The text of `ids`."""

  @abc.abstractmethod
  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: the UTF-8 bytes each id stands for (0 for special tokens)."""
