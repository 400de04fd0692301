"""Test set-up: 8 simulated CPU devices (before jax is imported) and the repo on sys.path."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes a minute or more (deselect: -m "not slow")')
