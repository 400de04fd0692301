"""Generated token ids -> text, piece by piece, cut at the request's stop strings.

Each piece is what the whole text gained since the last one, so streamed pieces add up to
the text returned without streaming. Text that may still change is held back: an incomplete
UTF-8 character, and an ending that could be the start of a stop string.
"""


class TextStream:
  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.ids: list[int] = []
    self.text = ''  # the visible text: everything before the first stop string
    self.stopped = False  # a stop string appeared
    self._sent = 0  # characters of `text` handed out

  def add(self, token_id: int) -> str:
    """The new piece of text once `token_id` is appended."""
    self.ids.append(token_id)
    self.text = self.tokenizer.decode(self.ids)
    cuts = [self.text.find(s) for s in self.stop if s in self.text]
    if cuts:
      self.text, self.stopped = self.text[:min(cuts)], True
      return self._piece(len(self.text))
    safe = len(self.text.rstrip('\ufffd'))
    for stop in self.stop:  # the longest ending that begins a stop string stays back
      for size in range(min(len(stop) - 1, safe), 0, -1):
        if self.text[:safe].endswith(stop[:size]):
          safe -= size
          break
    return self._piece(safe)

  def finish(self) -> str:
    """The rest of the text, once generation has ended."""
    return self._piece(len(self.text))

  def _piece(self, end: int) -> str:
    if end <= self._sent:
      return ''
    piece, self._sent = self.text[self._sent:end], end
    return piece
