"""The transformer: causality, rotary, decoding with the cache, scan, remat, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax import model as model_lib
from llama_jax import rope
from llama_jax.errors import ConfigError

CONFIG = model_lib.ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97,
                               multiple_of=16, max_seq_len=64, dtype='float32',
                               attention='reference', remat='none')


def make_model(config=CONFIG, seed=0):
  return model_lib.Transformer(config, rngs=nnx.Rngs(seed))


def random_tokens(shape, seed=1, vocab=CONFIG.vocab_size):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def test_rms_norm_matches_formula():
  norm = model_lib.RMSNorm(CONFIG, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.linspace(0.5, 2.0, CONFIG.dim)
  x = np.random.default_rng(0).normal(size=(2, 3, CONFIG.dim)).astype(np.float32)
  expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + CONFIG.norm_eps) * np.asarray(
      norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


@pytest.mark.parametrize('attention', ['reference', 'blockwise'])
def test_changing_a_token_changes_no_earlier_logit(attention):
  model = make_model(model_lib.ModelConfig(**{**CONFIG.__dict__, 'attention': attention}))
  tokens = random_tokens((2, 20))
  changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % CONFIG.vocab_size)
  logits, _ = model(tokens)
  changed_logits, _ = model(changed)
  np.testing.assert_array_equal(logits[:, :12], changed_logits[:, :12])
  assert np.abs(logits[:, 12:] - changed_logits[:, 12:]).max() > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  q = jax.random.normal(keys[0], (1, 1, 1, 16))
  k = jax.random.normal(keys[1], (1, 1, 1, 16))

  def score(q_position, k_position):
    rotated_q = model_lib.apply_rotary(q, jnp.array([[q_position]]), 10000.0)
    rotated_k = model_lib.apply_rotary(k, jnp.array([[k_position]]), 10000.0)
    return float(jnp.sum(rotated_q * rotated_k))

  for shift in (1, 7, 1000):
    assert score(5, 2) == pytest.approx(score(5 + shift, 2 + shift), abs=1e-4)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the distance


def test_rotary_matches_complex_rotation():
  """Pair (x_i, x_{i+d/2}) as a complex number, rotated by position * theta^(-2i/d)."""
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  positions = np.array([[0, 5, 11]])
  out = np.asarray(model_lib.apply_rotary(jnp.asarray(x), jnp.asarray(positions), 500.0))
  freq = 500.0**(-np.arange(4) / 4)
  pairs = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * positions[..., None, None] * freq)
  np.testing.assert_allclose(out, np.concatenate([pairs.real, pairs.imag], -1), atol=1e-5)


def meta_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
  """Meta's llama-models `apply_scaling` (Llama 3.1), element by element in float64."""
  low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, \
      old_context_len / high_freq_factor
  scaled = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < high_freq_wavelen:
      scaled.append(freq)
    elif wavelen > low_freq_wavelen:
      scaled.append(freq / factor)
    else:
      smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      scaled.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(scaled)


@pytest.mark.parametrize('head_dim,theta,context', [(128, 500000.0, 8192), (32, 500000.0, 32),
                                                    (64, 10000.0, 64)])
def test_llama3_frequencies_match_metas_apply_scaling(head_dim, theta, context):
  freqs = theta**(-np.arange(0, head_dim, 2) / head_dim)
  want = meta_apply_scaling(freqs, 8.0, 1.0, 4.0, context)
  scaling = rope.scaling_from_dict(
      dict(type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
           original_max_position_embeddings=context))
  got = np.asarray(rope.inverse_frequencies(head_dim, theta, scaling))
  np.testing.assert_allclose(got, want, rtol=2e-6)
  kept, divided = np.isclose(want, freqs), np.isclose(want, freqs / 8)
  assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands
  linear = rope.scaling_from_dict(dict(type='linear', factor=4.0))
  np.testing.assert_allclose(rope.inverse_frequencies(head_dim, theta, linear), freqs / 4,
                             rtol=2e-6)


# bfloat16: the cache travels through the layer scan as its bits (model.as_bits); logits
# are about 0.5 here, so bits read as numbers would miss by far more than the tolerance.
@pytest.mark.parametrize('dtype,atol', [('float32', 1e-5), ('bfloat16', 1e-2)])
def test_cached_decoding_matches_full_forward(dtype, atol):
  config = model_lib.ModelConfig(**{**CONFIG.__dict__, 'dtype': dtype})
  model = make_model(config)
  tokens = random_tokens((2, 12))
  logits, _ = model(tokens)
  cache = model_lib.KVCache.zeros(config, batch=2, max_len=16)
  prefill_logits, cache = model(tokens[:, :5], cache=cache)
  step_logits = [prefill_logits]
  for t in range(5, 12):
    step, cache = model(tokens[:, t:t + 1], cache=cache)
    step_logits.append(step)
  np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), logits, atol=atol)
  assert cache.index.tolist() == [12, 12]


def test_left_padded_decoding_matches_unpadded_forward():
  model = make_model()
  tokens = random_tokens((1, 6))
  logits, _ = model(tokens)
  padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
  positions = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
  cache = model_lib.KVCache.zeros(CONFIG, batch=1, max_len=9)
  padded_logits, _ = model(padded, positions, segment_ids, cache=cache)
  np.testing.assert_allclose(padded_logits[:, 3:], logits, atol=1e-5)


def test_scanned_and_unscanned_give_the_same_logits():
  model = make_model()
  unscanned = make_model(model_lib.ModelConfig(**{**CONFIG.__dict__, 'scan_layers': False}))
  nnx.update(unscanned, nnx.state(model))
  tokens = random_tokens((2, 10))
  np.testing.assert_allclose(model(tokens)[0], unscanned(tokens)[0], atol=1e-5)


def loss_fn(model, tokens):
  logits, _ = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [True, False])
def test_every_remat_policy_gives_the_same_gradients(scan_layers):
  tokens = random_tokens((2, 12))
  grads = {}
  for remat in model_lib.REMAT_POLICIES:
    config = model_lib.ModelConfig(**{
        **CONFIG.__dict__, 'remat': remat,
        'scan_layers': scan_layers
    })
    grads[remat] = nnx.jit(nnx.grad(loss_fn))(make_model(config), tokens)
  for remat, grad in grads.items():
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(grads['none'])):
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=remat)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = make_model(model_lib.ModelConfig(**{**CONFIG.__dict__, 'dtype': 'bfloat16'}))
  logits, _ = model(random_tokens((1, 8)))
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_parameter_names_its_logical_axes():
  params = nnx.state(make_model(), nnx.Param)
  specs = jax.tree.leaves(nnx.get_partition_spec(params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  allowed = {'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab', 'layers'}
  arrays = jax.tree.leaves(params)
  assert len(specs) == len(arrays) == 3 + 9  # embedding, norm, output; 9 per stacked block
  for spec, array in zip(specs, arrays):
    assert len(spec) == array.ndim and set(spec) <= allowed, spec


def test_sequence_longer_than_max_is_a_config_error():
  with pytest.raises(ConfigError, match='max_seq_len'):
    make_model()(random_tokens((1, CONFIG.max_seq_len + 1)))


def test_tiny_model_overfits_one_batch():
  config = model_lib.ModelConfig(**{**CONFIG.__dict__, 'n_layers': 2})
  model = make_model(config)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = random_tokens((4, 17))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss

  for _ in range(150):
    loss = step(model, optimizer)
  assert float(loss) < 0.1


@pytest.mark.parametrize('attention', ['reference', 'blockwise'])
def test_segment_mask_hides_the_previous_document(attention):
  """Packed [doc A | doc B]: B's logits do not change when A does, and equal B alone."""
  model = make_model(model_lib.ModelConfig(**{**CONFIG.__dict__, 'attention': attention}))
  tokens = random_tokens((1, 14))
  segment_ids = jnp.array([[1] * 6 + [2] * 8])
  positions = jnp.array([list(range(6)) + list(range(8))])
  logits, _ = model(tokens, positions, segment_ids)
  altered = tokens.at[:, :6].set((tokens[:, :6] + 5) % CONFIG.vocab_size)
  altered_logits, _ = model(altered, positions, segment_ids)
  np.testing.assert_allclose(altered_logits[:, 6:], logits[:, 6:], atol=1e-5)
  alone, _ = model(tokens[:, 6:])
  np.testing.assert_allclose(logits[:, 6:], alone, atol=1e-5)
  assert np.abs(altered_logits[:, :6] - logits[:, :6]).max() > 1e-3
