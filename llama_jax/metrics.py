"""Model FLOPs, peak FLOP/s per device, MFU, and the metric writers (TensorBoard, JSONL)."""

import contextlib
import json
import os
import time

import jax
from tensorboardX import SummaryWriter

# Dense bfloat16 peak FLOP/s per device, by a substring of `device.device_kind`.
PEAK_FLOPS = (
    ('v6 lite', 918e12),
    ('v6e', 918e12),
    ('v5 lite', 197e12),
    ('v5e', 197e12),
    ('v5p', 459e12),
    ('v5', 459e12),
    ('v4', 275e12),
    ('h200', 989e12),
    ('h100', 989e12),
    ('a100', 312e12),
)


def peak_flops_per_device(device, cpu_peak_tflops: float) -> float | None:
  """The device's peak bf16 FLOP/s; for CPUs the configured value (0: unknown); None if
  unknown (no MFU is reported then)."""
  if device.platform == 'cpu':
    return cpu_peak_tflops * 1e12 or None
  kind = device.device_kind.lower()
  return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def flops_per_token(model_config, seq_len: int, n_params: int) -> float:
  """Training FLOPs per token: 6 x the matmul parameters, plus causal attention.

  Every parameter but the input embedding (a lookup) is a matmul weight: 2 FLOPs each
  forward, 4 backward. Attention scores and weighted values add 2 x 2 x seq_len x dim per
  layer forward for full attention, half of that when causal, x3 with the backward.
  """
  matmul_params = n_params - model_config.vocab_size * model_config.dim
  attention = 6 * model_config.n_layers * seq_len * model_config.dim
  return 6 * matmul_params + attention


class IntervalTimer:
  """Steps and seconds since the last lap, leaving out the time spent while paused."""
  def __init__(self, clock=time.perf_counter):
    self.clock = clock
    self.start, self.steps = clock(), 0

  def step(self) -> None:
    self.steps += 1

  @contextlib.contextmanager
  def paused(self):
    paused_at = self.clock()
    try:
      yield
    finally:
      self.start += self.clock() - paused_at

  def lap(self) -> tuple[int, float]:
    """(steps, seconds) since the previous lap; starts the next one."""
    now = self.clock()
    steps, seconds = self.steps, now - self.start
    self.start, self.steps = now, 0
    return steps, seconds


class MetricsWriter:
  """Writes scalar rows to TensorBoard and to metrics.jsonl; only on process 0."""
  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self.tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      try:
        self.tensorboard.close()
      finally:
        self.jsonl.close()
