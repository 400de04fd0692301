"""Graceful stops: SIGTERM (preemption notice) or SIGINT -> finish the step, checkpoint, exit.

The handler only raises a flag; the training loop checks it between steps, so a second
signal during the final save changes nothing. With several processes the flag is shared
at logging steps (one all-gather of a scalar), so every process stops at the same step.
"""

import signal

import jax

from llama_jax import processes


class StopRequest:
  """Catches SIGTERM and SIGINT while active (a context manager)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(
        f'\nreceived {signal.Signals(signum).name}: stopping after this step and saving a '
        'checkpoint', flush=True)

  def should_stop(self, at_logging_step: bool) -> bool:
    """Whether to stop now; on several processes only decided at logging steps."""
    if jax.process_count() == 1:
      return self.requested
    if not at_logging_step:
      return False
    return not processes.all_true(not self.requested)
