"""Next-token cross-entropy of the output projection, a slice of the sequence at a time.

The float32 logits of a whole batch ([batch, length, vocab]: 2 GiB for 8 x 2048 tokens of
a 32000 vocabulary) are never built. The sequence is cut into `chunks` interleaved slices;
for each, the logits are formed, reduced to the losses, and turned at once into the
gradients of the loss with respect to the features and the output weights. The backward
pass then only scales those gradients, so the cross-entropy costs the three matmuls of
plain autodiff (logits, feature gradient, weight gradient) and no recomputation.
"""

import functools

import jax
import jax.numpy as jnp

from llama_jax import cpu_products
from llama_jax.sharding import compute_platform, constrain


def _to_chunks(x, chunks):
  """[batch, length, ...] -> [chunks, batch, length / chunks, ...]; t goes to chunk t % chunks.

  Interleaving keeps each chunk spread over the whole sequence, so a sequence-sharded
  length axis stays sharded the same way inside every chunk (no gather).
  """
  batch, length = x.shape[:2]
  return jnp.moveaxis(x.reshape(batch, length // chunks, chunks, *x.shape[2:]), 2, 0)


def _from_chunks(x):
  """Inverse of _to_chunks: [chunks, batch, length / chunks, ...] -> [batch, length, ...]."""
  chunks, batch, chunk_len = x.shape[:3]
  return jnp.moveaxis(x, 0, 2).reshape(batch, chunk_len * chunks, *x.shape[3:])


def _chunk_losses(x, w, targets, weights, z_loss):
  """Losses of one chunk and the gradients of its loss sum.

  x: [batch, chunk_len, embed]; w: [embed, vocab] in x's dtype; targets, weights:
  [batch, chunk_len]. Returns loss_sum, nll_sum, dx [batch, chunk_len, embed] and
  dw [embed, vocab] float32. The token axes are flattened on CPU only (see projection.project).
  """
  shape = x.shape
  logit_axes = ('batch', 'length', 'act_vocab')
  if compute_platform() == 'cpu':
    x, targets, weights = x.reshape(-1, shape[-1]), targets.reshape(-1), weights.reshape(-1)
    logit_axes = (('batch', 'length'), 'act_vocab')
  logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)  # [*tokens, vocab]
  logits = constrain(logits, logit_axes)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [*tokens]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logits
  loss_sum = jnp.sum(weights * (nll + z_loss * jnp.square(log_z)))
  nll_sum = jnp.sum(weights * nll)
  # d loss_sum / d logits = w (1 + 2 z log_z) softmax - w onehot(target)
  softmax = jnp.exp(logits - log_z[..., None])
  dlogits = (weights * (1 + 2 * z_loss * log_z))[..., None] * softmax
  dlogits = dlogits - weights[..., None] * jax.nn.one_hot(targets, w.shape[1], dtype=jnp.float32)
  dlogits = dlogits.astype(x.dtype)
  if compute_platform() == 'cpu':  # in the form of XLA:CPU's fast bfloat16 products
    dx = cpu_products.einsum('tv,ev->te', dlogits, w, preferred_element_type=jnp.float32)
    dw = cpu_products.einsum('te,tv->ev', x, dlogits, preferred_element_type=jnp.float32)
    return loss_sum, nll_sum, dx.astype(x.dtype).reshape(shape), dw
  dx = jnp.matmul(dlogits, w.T).astype(x.dtype).reshape(shape)
  tokens = tuple(range(x.ndim - 1))
  dw = jnp.tensordot(x, dlogits, axes=(tokens, tokens), preferred_element_type=jnp.float32)
  return loss_sum, nll_sum, dx, dw


def _scan_chunks(x, w, targets, weights, z_loss, chunks):
  """Sums the chunks' losses and weight gradients; stacks their feature gradients."""
  w = w.astype(x.dtype)

  def body(carry, chunk):
    loss_sum, nll_sum, dw = carry
    x_c, targets_c, weights_c = chunk
    loss, nll, dx, dw_c = _chunk_losses(x_c, w, targets_c, weights_c, z_loss)
    dw = constrain(dw + dw_c, ('embed', 'vocab'))
    return (loss_sum + loss, nll_sum + nll, dw), dx

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(w.shape, jnp.float32))
  (loss_sum, nll_sum, dw), dx = jax.lax.scan(
      body, init, (_to_chunks(x, chunks), _to_chunks(targets, chunks), _to_chunks(weights, chunks)))
  return loss_sum, nll_sum, _from_chunks(dx), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cross_entropy(x, w, targets, weights, z_loss: float, chunks: int):
  """Weighted cross-entropy of logits = x @ w against targets.

  x: [batch, length, embed] final features in the compute dtype; w: [embed, vocab]
  float32 output weights; targets: [batch, length] int; weights: [batch, length] float32
  (0 ignores a position). `length` must be a multiple of `chunks`.
  Returns (loss_sum, nll_sum): the sums over positions of weights * (nll + z_loss *
  log_z^2) and of weights * nll. Only loss_sum is differentiated; nll_sum is a metric
  and passes no gradient back.
  """
  return _scan_chunks(x, w, targets, weights, z_loss, chunks)[:2]


def _forward(x, w, targets, weights, z_loss, chunks):
  loss_sum, nll_sum, dx, dw = _scan_chunks(x, w, targets, weights, z_loss, chunks)
  return (loss_sum, nll_sum), (dx, dw, targets, weights)


def _backward(z_loss, chunks, residuals, cotangents):
  del z_loss, chunks
  dx, dw, targets, weights = residuals
  g_loss, _ = cotangents  # nll_sum passes no gradient
  return ((g_loss * dx).astype(dx.dtype), g_loss * dw, None, jnp.zeros_like(weights))


cross_entropy.defvjp(_forward, _backward)
