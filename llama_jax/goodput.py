"""Goodput: where a run's wall time goes, and how much of it trained the model.

The loop times what is not training: `startup` (building, restoring, opening the data),
`compile`, `data` (waiting for the next batch; a wait over STALL_S counts as a stall),
`evaluation` and `checkpoint` (the blocking part of saving). `steps` is the rest of the
wall time: dispatching steps and waiting for the device. After a restart the steps between
the restored checkpoint and the furthest step the interrupted run had logged are done
again: `lost` is their share of `steps`. goodput = (steps - lost) / wall.
"""

import contextlib
import time

STALL_S = 0.1  # a wait for data longer than this is a data-loader stall
MEASURED = ('startup', 'compile', 'data', 'evaluation', 'checkpoint')


class Goodput:
  """Accumulates seconds per category; `row()` is the account so far."""
  def __init__(self, redone_steps: int = 0, clock=time.perf_counter):
    self.clock, self.redone_steps = clock, redone_steps
    self.start = clock()
    self.seconds = dict.fromkeys(MEASURED, 0.0)
    self.stalls = self.steps_run = 0

  @contextlib.contextmanager
  def timing(self, category: str):
    start = self.clock()
    try:
      yield
    finally:
      seconds = self.clock() - start
      self.seconds[category] += seconds
      if category == 'data' and seconds > STALL_S:
        self.stalls += 1

  def step_done(self) -> None:
    self.steps_run += 1

  def row(self) -> dict:
    """{'goodput/NAME': value}: seconds per category, wall, lost, stalls and the fraction."""
    wall = self.clock() - self.start
    steps = max(wall - sum(self.seconds.values()), 0.0)
    lost = steps * min(self.redone_steps, self.steps_run) / max(self.steps_run, 1)
    row = {f'goodput/{name}_s': seconds for name, seconds in self.seconds.items()}
    row.update({
        'goodput/steps_s': steps,
        'goodput/lost_s': lost,
        'goodput/wall_s': wall,
        'goodput/redone_steps': self.redone_steps,
        'goodput/data_stalls': self.stalls,
        'goodput/fraction': (steps - lost) / wall if wall else 0.0
    })
    return row

  def summary(self) -> str:
    row = self.row()
    wall = row['goodput/wall_s']
    parts = ', '.join(
        f'{name} {row[f"goodput/{name}_s"]:.1f}s' for name in ('steps', *MEASURED, 'lost'))
    return (f'Goodput {row["goodput/fraction"]:.1%} of {wall:.1f}s: {parts}; '
            f'{self.stalls} data-loader stall(s) over {STALL_S:g}s; '
            f'{self.redone_steps} step(s) redone after the restart')
