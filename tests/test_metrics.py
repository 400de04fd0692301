"""Metrics: throughput over logging intervals, peak FLOP/s per device."""

import jax

from llama_jax import metrics


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_interval_timer_leaves_out_paused_time():
  """Two steps of 1 s around a 5 s evaluation, then a lap: 2 steps in 2 s, not in 7 s or
  (the old defect) 2 steps in the 1 s after the evaluation."""
  clock = FakeClock()
  timer = metrics.IntervalTimer(clock)
  clock.now += 1
  timer.step()
  with timer.paused():
    clock.now += 5
  clock.now += 1
  timer.step()
  assert timer.lap() == (2, 2.0)
  clock.now += 3
  timer.step()
  assert timer.lap() == (1, 3.0)


def test_no_mfu_on_a_cpu_unless_its_peak_is_configured():
  cpu = jax.devices('cpu')[0]
  assert metrics.peak_flops_per_device(cpu, 0.0) is None
  assert metrics.peak_flops_per_device(cpu, 2.5) == 2.5e12
