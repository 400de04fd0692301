"""cross_entropy.py: chunked losses and their gradients against plain autodiff of full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.cross_entropy import cross_entropy

BATCH, LENGTH, EMBED, VOCAB = 3, 12, 16, 50


def inputs(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (BATCH, LENGTH, EMBED)).astype(dtype)
  w = jax.random.normal(keys[1], (EMBED, VOCAB))
  targets = jax.random.randint(keys[2], (BATCH, LENGTH), 0, VOCAB)
  weights = (jax.random.uniform(keys[3], (BATCH, LENGTH)) > 0.3).astype(jnp.float32)
  return x, w, targets, weights


def naive_losses(x, w, targets, weights, z_loss):
  """The textbook loss on the whole [batch, length, vocab] float32 logits."""
  logits = jnp.einsum('bte,ev->btv', x.astype(jnp.float32), w, precision='highest')
  log_z = jax.nn.logsumexp(logits, axis=-1)
  nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(weights * (nll + z_loss * log_z**2)), jnp.sum(weights * nll)


@pytest.mark.parametrize('chunks', [1, 3, 4, 12])
@pytest.mark.parametrize('z_loss', [0.0, 1e-2])
def test_losses_and_gradients_match_full_logits(chunks, z_loss):
  x, w, targets, weights = inputs()
  got = cross_entropy(x, w, targets, weights, z_loss, chunks)
  want = naive_losses(x, w, targets, weights, z_loss)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = lambda f: jax.grad(lambda x, w: f(x, w, targets, weights, z_loss)[0], (0, 1))(x, w)
  got_dx, got_dw = grad(lambda *a: cross_entropy(*a, chunks))
  want_dx, want_dw = grad(naive_losses)
  np.testing.assert_allclose(got_dx, want_dx, atol=1e-5)
  np.testing.assert_allclose(got_dw, want_dw, atol=1e-5)
  assert got_dw.dtype == jnp.float32


def test_bfloat16_features_stay_close_to_float32():
  x, w, targets, weights = inputs(jnp.bfloat16)
  got = cross_entropy(x, w, targets, weights, 0.0, 4)
  want = naive_losses(x, w, targets, weights, 0.0)
  np.testing.assert_allclose(got, want, rtol=2e-2)
  dx = jax.grad(lambda x: cross_entropy(x, w, targets, weights, 0.0, 4)[0])(x)
  want_dx = jax.grad(lambda x: naive_losses(x, w, targets, weights, 0.0)[0])(x.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(jnp.float32), want_dx,
                             atol=0.05 * float(jnp.abs(want_dx).max()))


def test_gradient_scales_with_the_cotangent():
  x, w, targets, weights = inputs()
  dx = jax.grad(lambda x: 3.0 * cross_entropy(x, w, targets, weights, 0.0, 2)[0])(x)
  want = jax.grad(lambda x: 3.0 * naive_losses(x, w, targets, weights, 0.0)[0])(x)
  np.testing.assert_allclose(dx, want, atol=1e-5)
