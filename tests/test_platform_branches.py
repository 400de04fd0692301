"""The model's and the loss's TPU/GPU code, executed on a CPU.

`projection.project` contracts unflattened [batch, length, ...] operands and the loss keeps its
[batch, length] token axes when the platform is not a CPU; on a CPU both flatten the token
axes into one. Here the platform the model and the loss see is forced to `gpu` (attention
stays `reference`) and the train step must give what the CPU branch gives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import default_step, make_batch, run_step

from llama_jax import cross_entropy, projection


# One device whole; every mesh axis, with chunked losses (one, four and two chunks).
@pytest.mark.parametrize('mesh_sizes,loss_chunks', [((1, 1, 1, 1), 1), ((1, 2, 2, 2), 4),
                                                    ((2, 2, 1, 2), 2)])
def test_accelerator_branches_equal_the_cpu_branch(mesh_sizes, loss_chunks, monkeypatch):
  devices = jax.devices()[:1] if mesh_sizes == (1, 1, 1, 1) else None
  want_state, want_metrics = default_step(mesh_sizes, loss_chunks)  # the CPU branch
  for module in (projection, cross_entropy):
    monkeypatch.setattr(module, 'compute_platform', lambda: 'gpu')
  jaxpr = jax.make_jaxpr(projection.project)(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))
  assert 'reshape' not in str(jaxpr)  # the forced branch is the one traced
  state, metrics = run_step(mesh_sizes, make_batch(), devices=devices, loss_chunks=loss_chunks)
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], want_metrics['grad_norm'], rtol=1e-4)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)
