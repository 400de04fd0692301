"""Every attention implementation against a naive NumPy loop and against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as attention_lib


def naive_attention(q, k, v, segment_ids):
  """One query at a time, in float64: softmax over the keys it may see."""
  batch, length, heads, head_dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros(q.shape)
  for b in range(batch):
    for i in range(length):
      visible = [j for j in range(i + 1)
                 if segment_ids is None or segment_ids[b, j] == segment_ids[b, i]]
      for n in range(heads):
        keys, values = k[b, visible, n // group], v[b, visible, n // group]
        scores = keys @ q[b, i, n] / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        out[b, i, n] = weights @ values / weights.sum()
  return out


def random_inputs(length, heads, kv_heads, with_segments, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (2, length, heads, 8))
  k = jax.random.normal(keys[1], (2, length, kv_heads, 8))
  v = jax.random.normal(keys[2], (2, length, kv_heads, 8))
  segments = None
  if with_segments:
    starts = jax.random.bernoulli(keys[3], 0.15, (2, length))
    segments = jnp.cumsum(starts, axis=1).astype(jnp.int32) + 1
  return q, k, v, segments


@pytest.mark.parametrize('with_segments', [False, True])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 1)])
def test_reference_matches_naive_loop(heads, kv_heads, with_segments):
  q, k, v, segments = random_inputs(11, heads, kv_heads, with_segments)
  out = attention_lib.reference_attention(q, k, v, segments, segments)
  expected = naive_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                             None if segments is None else np.asarray(segments))
  np.testing.assert_allclose(out, expected, atol=2e-6)


@pytest.mark.parametrize('implementation', ['dot_product', 'blockwise'])
@pytest.mark.parametrize('length', [1, 16, 37])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_implementation_matches_reference(implementation, length, heads, kv_heads,
                                          with_segments):
  q, k, v, segments = random_inputs(length, heads, kv_heads, with_segments, seed=length)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)

  def loss(attention_fn, q, k, v):
    return jnp.sum(attention_fn(q, k, v) * cotangent)

  def candidate(q, k, v):  # block size 16: several blocks, and lengths that do not divide it
    return attention_lib.attention(q, k, v, segments, segments, implementation=implementation,
                                   block_size=16)

  def reference(q, k, v):
    return attention_lib.reference_attention(q, k, v, segments, segments)

  np.testing.assert_allclose(candidate(q, k, v), reference(q, k, v), atol=1e-5)
  grads = jax.grad(lambda *a: loss(candidate, *a), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
  for grad, want in zip(grads, expected):
    np.testing.assert_allclose(grad, want, atol=2e-5)


def test_blockwise_never_builds_a_length_by_length_array():
  length, block = 1024, 128
  q, k, v, _ = random_inputs(length, 2, 2, False)
  grad_fn = jax.grad(lambda q, k, v: attention_lib.blockwise_attention(
      q, k, v, block_size=block).sum(), argnums=(0, 1, 2))
  square = f'{length}x{length}x'  # a [.., length, length, ..] tensor in StableHLO text
  assert square not in jax.jit(grad_fn).lower(q, k, v).as_text()
  reference_grad = jax.grad(lambda q: attention_lib.reference_attention(q, k, v).sum())
  assert square in jax.jit(reference_grad).lower(q).as_text()  # the check can fail


def test_auto_resolves_per_backend():
  assert attention_lib.resolve_implementation('auto', 'cpu') == 'reference'
  assert attention_lib.resolve_implementation('auto', 'gpu') == 'dot_product'
  assert attention_lib.resolve_implementation('auto', 'tpu') == 'splash'
