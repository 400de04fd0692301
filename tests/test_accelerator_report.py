"""The accelerator report's smoke run: every section, every correctness check passing."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_report_runs_every_section_and_every_check_passes(tmp_path):
  output = tmp_path / 'report.md'
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.accelerator_report', '--smoke', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = output.read_text()
  for section in ('Setup', 'Correctness', 'Speed', 'Capacity', 'Decoding'):
    assert f'## {section}' in report
  checks = re.findall(r'^\| (train step|attention|KV-cache).*\| (pass|FAIL) \|$', report, re.M)
  # loss and gradient norm; blockwise, splash and triton (interpreted) vs reference; decoding
  assert len(checks) == 6 and all(result == 'pass' for _, result in checks), report
  speed_rows = re.findall(r'^\| reference \| (save_dots|full) \| True \| ([\d,]+) \|', report, re.M)
  assert len(speed_rows) == 2
  largest = re.findall(r'^\| largest that fits: dim \d+, \d+ layers \| ([^|]+) \|.*\| fits \|$',
                       report, re.M)
  assert largest == ['float32', 'bf16 weights + no master'], report  # each memory mode's
  assert len(re.findall(r'^\| a \(.* parameters, bfloat16\) \| [12] \|', report, re.M)) == 2
