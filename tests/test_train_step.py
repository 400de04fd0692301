"""The sharded train step on 8 simulated CPU devices, the optimizer and its schedule."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import sharding as sharding_lib
from llama_jax import steps
from llama_jax.errors import ConfigError

MODEL = model_lib.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                              multiple_of=16, max_seq_len=32, dtype='float32',
                              attention='reference', remat='full')
RULES = default.get_config().mesh.rules


def optim_config(**overrides):
  config = default.get_config().optim
  config.update({'learning_rate': 1e-2, 'warmup_steps': 2, **overrides})
  return config


def make_batch(batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MODEL.vocab_size, (batch, length + 1)).astype(np.int32)
  segments = np.cumsum(rng.random((batch, length + 1)) < 0.1, axis=1).astype(np.int32) + 1
  positions = np.zeros_like(segments)
  for row in range(batch):
    for t in range(1, length + 1):
      positions[row, t] = 0 if segments[row, t] != segments[row,
                                                            t - 1] else positions[row, t - 1] + 1
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1],
      'weights': (segments[:, 1:] == segments[:, :-1]).astype(np.float32)
  }


def run_step(mesh_sizes, batch, microbatches=1, devices=None, loss_chunks=1, model=MODEL):
  mesh_config = ml_collections.ConfigDict(dict(zip(sharding_lib.MESH_AXES, mesh_sizes)))
  mesh = sharding_lib.make_mesh(mesh_config, devices)
  optimizer = optim.make_optimizer(optim_config(), train_steps=10)
  abstract = steps.abstract_state(model, optimizer)
  shardings = sharding_lib.state_shardings(abstract, mesh, RULES)
  state = steps.create_sharded_state(0, model, optimizer, shardings)
  step = steps.jit_train_step(mesh, RULES, shardings, graphdef=steps.graphdef_of(model),
                              optimizer=optimizer,
                              learning_rate=optim.learning_rate_schedule(optim_config(), 10),
                              clip_norm=optim_config().clip_norm, microbatches=microbatches,
                              z_loss=1e-4, segment_mask=True, loss_chunks=loss_chunks)
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh, RULES))
  return step(state, batch)


@functools.cache  # test_platform_branches compares with the same steps: each runs once
def default_step(mesh_sizes, loss_chunks=1):
  """(state, metrics) of run_step on make_batch() (one device for mesh (1, 1, 1, 1))."""
  devices = jax.devices()[:1] if mesh_sizes == (1, 1, 1, 1) else None
  return run_step(mesh_sizes, make_batch(), devices=devices, loss_chunks=loss_chunks)


@pytest.fixture(scope='module')
def single_device_step():
  return default_step((1, 1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2), (1, 1, 8, 1),
                                        (1, 8, 1, 1)])
def test_sharded_step_equals_single_device(mesh_sizes, single_device_step):
  want_state, want_metrics = single_device_step
  state, metrics = run_step(mesh_sizes, make_batch())
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], want_metrics['grad_norm'], rtol=1e-4)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)
  # The shardings follow the rules: check the arrays, not only the numbers.
  sizes = dict(zip(sharding_lib.MESH_AXES, mesh_sizes))
  w1 = state.params['layers']['feed_forward']['w1'][...]  # [layers, embed, mlp]
  assert w1.sharding.spec == jax.sharding.PartitionSpec(None, ('fsdp', 'sequence'), 'tensor')
  shard_shape = w1.addressable_shards[0].data.shape
  parameter_shards = sizes['fsdp'] * sizes['sequence']  # ZeRO-3 over fsdp and sequence
  assert shard_shape == (2, 64 // parameter_shards, MODEL.hidden_dim // sizes['tensor'])
  mu = state.opt_state[1][0].mu['layers']['feed_forward']['w1'][...]
  assert mu.addressable_shards[0].data.shape == shard_shape


def test_chunked_loss_on_a_sharded_sequence_equals_single_device(single_device_step):
  want_state, want_metrics = single_device_step
  state, metrics = default_step((1, 2, 2, 2), loss_chunks=4)
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize('attention,mesh_sizes',
                         [('splash', (1, 8, 1, 1)), ('splash', (1, 2, 2, 2)),
                          ('splash', (2, 1, 2, 2)), ('triton', (1, 2, 2, 2))])
@pytest.mark.slow
def test_pallas_kernel_in_the_sharded_step_equals_reference(attention, mesh_sizes):
  """A Pallas kernel (interpreted on the CPU) under shard_map on fsdp, tensor and
  sequence meshes: the same loss, gradient norm and updated parameters as `reference`."""
  model = dataclasses.replace(MODEL, max_seq_len=128)
  batch = make_batch(length=128)
  want_state, want_metrics = run_step(mesh_sizes, batch, model=model)
  state, metrics = run_step(mesh_sizes, batch,
                            model=dataclasses.replace(model, attention=attention))
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], want_metrics['grad_norm'], rtol=1e-4)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_gradient_accumulation_equals_full_batch(single_device_step):
  want_state, want_metrics = single_device_step
  state, metrics = run_step((1, 1, 1, 1), make_batch(), microbatches=4, devices=jax.devices()[:1])
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_loss_matches_naive_cross_entropy():
  batch = make_batch()
  model = model_lib.Transformer(MODEL, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  loss, weight, _ = steps.token_losses(params, graphdef, batch, 0.0, True, loss_chunks=1)
  logits, _ = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  expected = (nll * batch['weights']).sum() / batch['weights'].sum()
  assert float(loss / weight) == pytest.approx(expected, rel=1e-5)


def test_schedule_matches_formula():
  config = optim_config(learning_rate=3e-4, warmup_steps=2000)
  schedule = optim.learning_rate_schedule(config, train_steps=100_000)
  cosine = lambda t: 3e-5 + (3e-4 - 3e-5) * 0.5 * (1 + math.cos(math.pi * (t - 2000) / 98_000))
  assert float(schedule(0)) == 0.0
  assert float(schedule(1000)) == pytest.approx(1.5e-4, rel=1e-5)
  assert float(schedule(2000)) == pytest.approx(3e-4, rel=1e-5)
  assert float(schedule(51_000)) == pytest.approx(cosine(51_000), rel=1e-4)
  assert float(schedule(100_000)) == pytest.approx(3e-5, rel=1e-4)


def test_weight_decay_spares_norm_scales():
  config = optim_config(learning_rate=1e-3, warmup_steps=0, weight_decay=0.5,
                        decay_embeddings=False)
  optimizer = optim.make_optimizer(config, train_steps=10)
  params = nnx.state(model_lib.Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['norm']['scale'][...], params['norm']['scale'][...])
  np.testing.assert_array_equal(new['layers']['ffn_norm']['scale'][...],
                                params['layers']['ffn_norm']['scale'][...])
  np.testing.assert_array_equal(new['embedding'][...], params['embedding'][...])
  w1, old_w1 = new['layers']['feed_forward']['w1'][...], params['layers']['feed_forward']['w1'][...]
  lr = float(optim.learning_rate_schedule(config, 10)(0))
  np.testing.assert_allclose(w1, old_w1 * (1 - lr * 0.5), rtol=1e-6)


def test_non_finite_step_is_skipped():
  batch = make_batch()
  batch['weights'] = batch['weights'] * np.nan
  state, metrics = run_step((1, 1, 1, 1), batch, devices=jax.devices()[:1])
  optimizer = optim.make_optimizer(optim_config(), 10)
  fresh = jax.jit(lambda seed: steps.init_state(seed, model_config=MODEL, optimizer=optimizer))(0)
  for got, want in zip(jax.tree.leaves((state.params, state.opt_state)),
                       jax.tree.leaves((fresh.params, fresh.opt_state))):
    np.testing.assert_array_equal(got, want)  # the optimizer's step count included
  assert int(metrics['skipped_steps']) == 1 and int(metrics['bad_steps']) == 1


@pytest.mark.parametrize('sizes,words', [
    ((3, 1, 1, 1), ['needs 3 devices', '8']),
    ((-1, -1, 1, 1), ['at most one -1']),
    ((1, 3, -1, 1), ['do not divide']),
])
def test_bad_mesh_is_a_clear_error(sizes, words):
  with pytest.raises(ConfigError) as error:
    sharding_lib.mesh_shape(dict(zip(sharding_lib.MESH_AXES, sizes)), 8)
  assert all(word in str(error.value) for word in words), str(error.value)


TIED = dataclasses.replace(MODEL, tie_embeddings=True)


def test_tied_embeddings_are_one_parameter_with_both_gradients():
  """The chunked loss of a tied model against autodiff through the full logits."""
  batch = make_batch()
  model = model_lib.Transformer(TIED, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  assert 'output' not in params
  assert model_lib.count_params(model) == model_lib.count_params(
      model_lib.Transformer(MODEL, rngs=nnx.Rngs(0))) - MODEL.dim * MODEL.vocab_size

  def chunked(params):
    return steps.token_losses(params, graphdef, batch, 0.0, True, loss_chunks=4)[0]

  def naive(params):
    logits, _ = nnx.merge(graphdef, params)(batch['inputs'], batch['positions'],
                                            batch['segment_ids'])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(nll * batch['weights'])

  want, got = jax.grad(naive)(params), jax.grad(chunked)(params)
  np.testing.assert_allclose(chunked(params), naive(params), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_tied_sharded_chunked_step_equals_single_device():
  want_state, want_metrics = run_step((1, 1, 1, 1), make_batch(), devices=jax.devices()[:1],
                                      model=TIED)
  state, metrics = run_step((1, 2, 2, 2), make_batch(), loss_chunks=4, model=TIED)
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, atol=2e-6)
  table = state.params['embedding'][...]  # [vocab, embed]: sharded once, as the rules say
  assert table.sharding.spec == jax.sharding.PartitionSpec('tensor', ('fsdp', 'sequence'))
  assert 'output' not in state.params and 'output' not in state.opt_state[1][0].mu
