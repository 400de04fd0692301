"""A hang watchdog: no train step for `timeout_s` -> every thread's stack, then exit.

On a pod slice one stuck host (a collective that never completes, a bucket read that
never returns) stalls every host without an error. The watchdog thread notices that the
loop has made no progress, prints which process and step it is, the stack of every thread,
and exits with HANG_EXIT_CODE so that a scheduler restarts the job, which then resumes from
the last checkpoint.
"""

import contextlib
import faulthandler
import os
import sys
import threading
import time

HANG_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a temporary failure, worth retrying


class HangWatchdog:
  """A context manager; call `beat(step)` after every step."""
  def __init__(self, timeout_s: float, process_index: int, clock=time.monotonic):
    self.timeout_s, self.process_index, self.clock = timeout_s, process_index, clock
    self.step, self.last_beat, self._paused = None, clock(), False
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._watch, name='hang-watchdog', daemon=True)

  def __enter__(self):
    if self.timeout_s > 0:
      self.last_beat = self.clock()
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stopped.set()

  def beat(self, step: int) -> None:
    self.step, self.last_beat = step, self.clock()

  @contextlib.contextmanager
  def paused(self):
    """No alarm inside (evaluation: its length is the user's choice, not a hang)."""
    self._paused = True
    try:
      yield
    finally:
      self._paused, self.last_beat = False, self.clock()

  def _watch(self):
    while not self._stopped.wait(min(self.timeout_s, 10.0)):
      idle = self.clock() - self.last_beat
      if idle > self.timeout_s and not self._paused:
        print(
            f'\nprocess {self.process_index}: no train step completed for {idle:.0f}s '
            f'(train.hang_timeout_s={self.timeout_s:g}) after step {self.step}; stacks of '
            f'every thread follow, then exit code {HANG_EXIT_CODE} (restart to resume)',
            file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)
