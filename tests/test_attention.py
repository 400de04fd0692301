"""Every attention implementation against a naive NumPy loop and against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as attention_lib
from llama_jax.errors import ConfigError


def naive_attention(q, k, v, segment_ids):
  """One query at a time, in float64: softmax over the keys it may see."""
  batch, length, heads, head_dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros(q.shape)
  for b in range(batch):
    for i in range(length):
      visible = [
          j for j in range(i + 1) if segment_ids is None or segment_ids[b, j] == segment_ids[b, i]
      ]
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


def check_against_reference(implementation, length, heads, kv_heads, with_segments, block):
  """Forward and gradients of `implementation` equal the reference's (float32)."""
  q, k, v, segments = random_inputs(length, heads, kv_heads, with_segments, seed=length)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)

  def output_and_grads(attention_fn):
    """attention_fn's output and the gradients of sum(output * cotangent): one compile."""
    def run(q, k, v):
      out, vjp = jax.vjp(attention_fn, q, k, v)
      return out, vjp(cotangent)

    return jax.jit(run)(q, k, v)

  got, grads = output_and_grads(lambda q, k, v: attention_lib.attention(
      q, k, v, segments, segments, implementation=implementation, block_size=block))
  want, expected = output_and_grads(
      lambda q, k, v: attention_lib.reference_attention(q, k, v, segments, segments))
  np.testing.assert_allclose(got, want, atol=1e-5)
  for grad, want in zip(grads, expected):
    np.testing.assert_allclose(grad, want, atol=2e-5)


# Block 16: one block, and three with a length that does not divide them.
@pytest.mark.parametrize('length', [1, 16, pytest.param(37, marks=pytest.mark.slow)])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_blockwise_matches_reference(length, heads, kv_heads, with_segments):
  check_against_reference('blockwise', length, heads, kv_heads, with_segments, block=16)


# One block and several; splash's blocks are multiples of the TPU's 128 lanes.
@pytest.mark.slow
@pytest.mark.parametrize('implementation,length,block', [('splash', 128, 128), ('splash', 256, 128),
                                                         ('triton', 16, 16), ('triton', 48, 16)])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2)])
def test_pallas_kernel_matches_reference_in_interpret_mode(implementation, length, block, heads,
                                                           kv_heads):
  """The TPU and GPU kernels themselves, run by Pallas' interpreter on the CPU, with packed
  documents whose boundaries fall inside blocks."""
  check_against_reference(implementation, length, heads, kv_heads, True, block=block)


@pytest.mark.slow
def test_splash_picks_its_own_block_when_none_is_given(monkeypatch):
  """At 256 tokens splash runs in 256-token blocks (the largest of 512/256/128 dividing it)."""
  blocks, kernel = [], attention_lib._splash_kernel

  def recording_kernel(*args, block, **options):
    blocks.append(block)
    return kernel(*args, block=block, **options)

  monkeypatch.setattr(attention_lib, '_splash_kernel', recording_kernel)
  q, k, v, segments = random_inputs(256, 4, 2, True, seed=5)
  got = attention_lib.attention(q, k, v, segments, segments, implementation='splash')
  assert blocks == [256]
  np.testing.assert_allclose(got, attention_lib.reference_attention(q, k, v, segments, segments),
                             atol=1e-5)


@pytest.mark.parametrize('implementation', ['blockwise', 'splash', 'triton'])
def test_training_attention_never_builds_a_length_by_length_array(implementation):
  """Forward and backward hold no [.., length, length, ..] array (the kernels as lowered
  for the CPU's interpreter, block by block)."""
  length = 1024
  q, k, v, segments = random_inputs(length, 2, 2, True)
  grad_fn = jax.grad(
      lambda q, k, v: attention_lib.attention(q, k, v, segments, segments, implementation=
                                              implementation, block_size=128).sum(),
      argnums=(0, 1, 2))
  square = f'{length}x{length}x'  # a [.., length, length, ..] tensor in StableHLO text
  assert square not in jax.jit(grad_fn).lower(q, k, v).as_text()
  reference_grad = jax.grad(lambda q: attention_lib.reference_attention(q, k, v).sum())
  assert square in jax.jit(reference_grad).lower(q).as_text()  # the check can fail


def test_auto_resolves_per_platform_and_shape(monkeypatch):
  monkeypatch.setattr(attention_lib, '_cudnn_found', lambda: True)  # as with jax[cuda13]

  def resolve(platform, length=2048, dtype=jnp.bfloat16, segments=True, implementation='auto'):
    return attention_lib.resolve_implementation(implementation, platform, length=length,
                                                head_dim=128, dtype=dtype, segments=segments)

  assert resolve('cpu') == 'reference'
  assert resolve('tpu') == 'splash'
  assert resolve('tpu', length=2000) == 'blockwise'
  assert resolve('tpu', length=64) == 'blockwise'  # shorter than one of the kernels' blocks
  assert resolve('gpu', length=64) == 'blockwise'
  assert resolve('gpu', segments=False) == 'cudnn'
  assert resolve('gpu') == 'triton'  # cuDNN cannot mask packed documents
  assert resolve('gpu', dtype=jnp.float32, segments=False) == 'triton'
  assert resolve('gpu', length=1000) == 'blockwise'
  with pytest.raises(
      ConfigError, match='model.attention=cudnn cannot keep attention inside '
      'packed documents.*data.segment_mask=False.*auto \\(here: triton\\)'):
    resolve('gpu', implementation='cudnn')
  with pytest.raises(ConfigError, match='splash runs on TPUs'):
    resolve('gpu', implementation='splash')
  with pytest.raises(ConfigError, match='multiple of 128, not 2000'):
    resolve('gpu', length=2000, implementation='triton')
  with pytest.raises(ConfigError, match='cudnn needs model.dtype bfloat16 or float16'):
    resolve('gpu', dtype=jnp.float32, segments=False, implementation='cudnn')
  monkeypatch.setattr(attention_lib, '_cudnn_found', lambda: False)  # as with gpu-aot
  assert resolve('gpu', segments=False) == 'triton'
  with pytest.raises(ConfigError, match='cudnn needs the cuDNN library.*here: triton'):
    resolve('gpu', segments=False, implementation='cudnn')
