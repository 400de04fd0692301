"""Context parallelism on 8 simulated CPU devices: the load-balanced layout, the loss and
gradients of every implementation and mode against one device, and what a chip holds and
computes in the compiled program."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from llama_jax import attention as attention_lib
from llama_jax import context_parallel
from llama_jax import experiment
from llama_jax import hlo
from llama_jax import sharding as sharding_lib
from llama_jax import steps
from llama_jax.errors import ConfigError
from test_train_step import MODEL, make_batch

RULES = default.get_config().mesh.rules
MESHES = [(1, 1, 4, 2), (1, 2, 4, 1), (2, 1, 2, 2)]  # (data, fsdp, sequence, tensor)


def make_mesh(sizes):
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(zip(sharding_lib.MESH_AXES, sizes))))


@pytest.mark.parametrize('shards', [1, 2, 3, 4])
def test_layout_holds_an_early_and_a_late_chunk_per_chip_and_inverts_exactly(shards):
  chunk = 3
  length = 2 * shards * chunk
  x = np.arange(2 * length).reshape(2, length) + 1000 * np.arange(2)[:, None]
  laid = np.asarray(context_parallel.to_layout(jnp.asarray(x), shards))
  for r in range(shards):  # chip r's contiguous slice: natural chunks r and 2N-1-r
    piece = laid[:, 2 * chunk * r:2 * chunk * (r + 1)]
    early, late = r * chunk, (2 * shards - 1 - r) * chunk
    np.testing.assert_array_equal(
        piece, np.concatenate([x[:, early:early + chunk], x[:, late:late + chunk]], 1))
  np.testing.assert_array_equal(context_parallel.from_layout(jnp.asarray(laid), shards), x)
  # Causal work per chip (visible keys of its queries) is the same on every chip.
  natural_index = laid[0] + 1  # query at natural index i sees i + 1 keys
  work = natural_index.reshape(shards, -1).sum(1)
  assert len(set(work.tolist())) == 1


def batch_whose_documents_cross_the_slices(length=32):
  batch = make_batch(batch=4, length=length, seed=3)
  segments = batch['segment_ids']
  # Some document runs across the boundary between two chips' natural slices.
  assert any((segments[:, b - 1] == segments[:, b]).any() for b in range(4, length, 4))
  assert (segments[:, -1] > segments[:, 0]).all()  # several documents in every row
  return batch


def loss_and_grads(sizes, model, batch, devices=None):
  """(loss sum, gradients) of steps.token_losses on a mesh, parameters in their shardings."""
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(zip(sharding_lib.MESH_AXES, sizes))),
                                devices)
  params = steps.init_state(0, model_config=model, optimizer=optax.identity()).params
  shardings = sharding_lib.state_shardings(params, mesh, RULES)
  params = jax.device_put(params, shardings)
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh, RULES))
  graphdef = steps.graphdef_of(model)

  @jax.jit
  def run(params, batch):
    with sharding_lib.activation_sharding(mesh, RULES):
      return jax.value_and_grad(lambda p: steps.token_losses(p, graphdef, batch, 1e-4, True, 1)[0])(
          params)

  return run(params, batch)


@pytest.fixture(scope='module')
def single_device():
  return loss_and_grads((1, 1, 1, 1), MODEL, batch_whose_documents_cross_the_slices(),
                        jax.devices()[:1])


# Every implementation x mode, and each mode on every mesh (12 combinations cost minutes).
CASES = [('reference', 'all_gather', MESHES[1]), ('reference', 'ring', MESHES[2]),
         ('blockwise', 'all_gather', MESHES[0]), ('blockwise', 'ring', MESHES[0]),
         ('blockwise', 'ring', MESHES[1]), ('blockwise', 'all_gather', MESHES[2])]


@pytest.mark.parametrize('implementation,mode,sizes', [
    case if case == ('blockwise', 'ring',
                     (1, 1, 4, 2)) else pytest.param(*case, marks=pytest.mark.slow)
    for case in CASES
])
def test_loss_and_gradients_equal_one_device(implementation, mode, sizes, single_device):
  """float32, GQA (4 heads, 2 key/value heads), packed documents crossing the chips' slices."""
  want_loss, want_grads = single_device
  model = dataclasses.replace(MODEL, attention=implementation, context_parallel=mode)
  loss, grads = loss_and_grads(sizes, model, batch_whose_documents_cross_the_slices())
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@functools.cache  # shared by the tests below: one compile per (implementation, mode, mesh)
def compiled_attention(implementation, mode, sizes, length=64, heads=4, kv_heads=1):
  """Optimized HLO of attention's forward and backward pass, on `sizes` or on one device."""
  q, k, v = (jnp.ones((2, length, n, 8)) for n in (heads, kv_heads, kv_heads))
  segments = jnp.ones((2, length), jnp.int32)

  def loss(q, k, v):
    return attention_lib.attention(q, k, v, segments, segments, implementation=implementation,
                                   block_size=8, context_parallel=mode).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  if sizes is None:
    return jax.jit(grad).lower(q, k, v).compile().as_text()
  mesh = make_mesh(sizes)
  spec = sharding_lib.logical_to_mesh(('batch', 'length', 'act_heads', None), RULES)
  sharding = jax.sharding.NamedSharding(mesh, spec)

  def sharded(q, k, v):
    with sharding_lib.activation_sharding(mesh, RULES):
      return grad(q, k, v)

  return jax.jit(sharded, in_shardings=(sharding,) * 3,
                 out_shardings=(sharding,) * 3).lower(q, k, v).compile().as_text()


@pytest.mark.parametrize('implementation', ['reference', 'blockwise', 'triton'])
@pytest.mark.parametrize('mode', context_parallel.MODES)
def test_no_chip_holds_the_queries_of_a_whole_sequence(implementation, mode):
  """On (fsdp 2, sequence 4) a chip holds one of the 2 rows, a quarter of its 64 tokens:
  no array as large as that row's 64 x 4 query heads x 8 may appear (the key/value heads
  of a whole row, 1 of them, may: that is the all-gather)."""
  text = compiled_attention(implementation, mode, (1, 2, 4, 1))
  whole_queries = 64 * 4 * 8 * 4  # bytes, float32
  largest = hlo.largest_arrays(text, 1)[0]
  assert largest[0] < whole_queries, largest


# Matmul FLOPs per chip / (one device's for the whole batch / 8 chips): the bounds.
FLOPS_PER_CHIP = {'reference': (0.5, 1.1), 'blockwise': (0.9, 1.1)}


@pytest.mark.parametrize('implementation', ['reference', 'blockwise'])
@pytest.mark.parametrize('mode', context_parallel.MODES)
def test_attention_flops_per_chip_stay_within_the_whole_sequence_s_over_the_chips(
    implementation, mode):
  """Matmul FLOPs per chip of the compiled forward and backward (loops by trip count) on
  (fsdp 2, sequence 4) against one device's for the whole batch over the 8 chips (2 rows
  x 4 slices); queries gathered across `sequence` make it 4 x.

  blockwise: one device visits the causal (query block, key block) pairs of a row, 36 of
  8 x 8; a chip the 9 of its own queries (3 in its own two chunks, 2 from each other
  chip), so it sees 1.000 x. Every loop's trip count must be in the HLO (dot_flops
  refuses a bound computed at run time). reference: one device scores the dense square; a
  chip skips the (query, key) chunk pairs it knows are masked, so it lands between the
  causal half and the bound: (2N + 2) C^2 / (4 N C^2) = 0.625 x.
  """
  per_chip = hlo.dot_flops(compiled_attention(implementation, mode, (1, 2, 4, 1)))
  whole = hlo.dot_flops(compiled_attention(implementation, 'all_gather', None))
  low, high = FLOPS_PER_CHIP[implementation]
  assert low * whole / 8 <= per_chip <= high * whole / 8, (per_chip, whole / 8)


@pytest.mark.parametrize('block', [64, 96, 128])  # within a chunk, across chunks' edges
def test_splash_mask_answers_every_block_as_the_dense_causal_mask_does(block):
  """The load-balanced mask answers splash's whole blocks without evaluating them; every
  block equals the causal mask of each row's natural index, built densely here."""
  length, shards = 768, 3
  mask = context_parallel._load_balanced_causal_mask(length, shards)
  natural = np.asarray(context_parallel.from_layout(jnp.arange(length)[None], shards))[0]
  layout_index = np.argsort(natural)  # the natural index of each row of the layout
  dense = layout_index[:, None] >= np.arange(length)[None, :]
  for q in range(0, length, block):
    for kv in range(0, length, block):
      window = slice(q, q + block), slice(kv, kv + block)
      np.testing.assert_array_equal(mask[window], dense[window])


def assert_laid_out_kernel_equals_the_reference(sizes, implementation, *, length, head_dim,
                                                document_rate, block, mode='all_gather'):
  """Output and gradients of the laid-out sequence (GQA: 4 heads, 2 key/value heads) equal
  the reference's on the natural one; document_rate None: unpacked rows."""
  shards = sizes[2]
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  q = jax.random.normal(keys[0], (2, length, 4, head_dim))
  k, v = (jax.random.normal(key, (2, length, 2, head_dim)) for key in keys[1:3])
  segments = None
  if document_rate:
    segments = (jnp.cumsum(jax.random.bernoulli(keys[3], document_rate,
                                                (2, length)), 1) + 1).astype(jnp.int32)
  cotangent = jax.random.normal(keys[4], q.shape)
  mesh = make_mesh(sizes)

  def kernel(q, k, v):
    with sharding_lib.activation_sharding(mesh, RULES):
      q, k, v, seg, ct = context_parallel.to_layout((q, k, v, segments, cotangent), shards)
      out = attention_lib.attention(q, k, v, seg, seg, implementation=implementation,
                                    block_size=block, context_parallel=mode)
      return jnp.sum(out * ct), context_parallel.from_layout(out, shards)

  def reference(q, k, v):
    out = attention_lib.reference_attention(q, k, v, segments, segments)
    return jnp.sum(out * cotangent), out

  (_, got), grads = jax.jit(jax.value_and_grad(kernel, (0, 1, 2), has_aux=True))(q, k, v)
  (_, want), want_grads = jax.value_and_grad(reference, (0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for grad, want_grad in zip(grads, want_grads):
    np.testing.assert_allclose(grad, want_grad, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('sizes', [MESHES[0], MESHES[2]])  # 4 and 2 sequence shards
def test_splash_attends_each_chip_s_own_queries_in_interpret_mode(sizes):
  """The TPU kernel (Pallas' interpreter) with q_seq_shards over `sequence`."""
  assert_laid_out_kernel_equals_the_reference(sizes, 'splash', length=512, head_dim=8,
                                              document_rate=0.02, block=128)


@pytest.mark.parametrize('sizes,mode,packed', [
    (MESHES[0], 'all_gather', True),
    pytest.param(MESHES[0], 'ring', False, marks=pytest.mark.slow),
    pytest.param(MESHES[1], 'ring', True, marks=pytest.mark.slow),
    pytest.param(MESHES[2], 'all_gather', False, marks=pytest.mark.slow),
])
def test_triton_attends_each_chip_s_own_queries_in_interpret_mode(sizes, mode, packed):
  """The GPU kernel (Pallas' interpreter) on each chip's chunks, forward with its
  log-sum-exp and backward given the row's; packed rows (documents of about 25 tokens, most
  crossing a chunk's edge) run their other-chip steps blockwise."""
  assert_laid_out_kernel_equals_the_reference(sizes, 'triton', length=128, head_dim=16,
                                              document_rate=0.04 if packed else None, block=16,
                                              mode=mode)


def test_ring_with_a_kernel_is_a_clear_error():
  config = default.get_config()
  config.train.seq_len = 2048
  config.model.context_parallel = 'ring'
  config.model.attention = 'splash'
  with pytest.raises(ConfigError, match='context_parallel=ring .* model.attention=splash cannot'):
    experiment.validate(config, dict(data=1, fsdp=1, sequence=4, tensor=1), 'tpu')
  for attention in ('triton', 'blockwise'):  # they return their log-sum-exp
    config.model.attention = attention
    experiment.validate(config, dict(data=1, fsdp=1, sequence=4, tensor=1), 'gpu')
  config.train.seq_len, config.train.loss_chunks = 2044, 1  # 4 divides it, 8 chunks do not
  with pytest.raises(ConfigError, match=r'divisible by 2 x mesh.sequence \(8\)'):
    experiment.validate(config, dict(data=1, fsdp=1, sequence=4, tensor=1), 'tpu')
