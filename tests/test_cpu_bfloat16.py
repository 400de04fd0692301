"""The CPU train step in bfloat16: its products accumulate in float32, its gradients stay
close to float32's (docs/cpu_bfloat16.md)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_train_step import MODEL, RULES, make_batch, optim_config

from llama_jax import cpu_products, hlo, lora, optim, steps
from llama_jax import model as model_lib
from llama_jax import sharding as sharding_lib


def lowered_step(model):
  """The single-device train step of `model`, lowered (not compiled)."""
  mesh_config = ml_collections.ConfigDict(dict.fromkeys(sharding_lib.MESH_AXES, 1))
  mesh = sharding_lib.make_mesh(mesh_config, jax.devices()[:1])
  optimizer = optim.make_optimizer(optim_config(), train_steps=10)
  abstract = steps.abstract_state(model, optimizer)
  shardings = sharding_lib.state_shardings(abstract, mesh, RULES)
  step = steps.jit_train_step(mesh, RULES, shardings, graphdef=steps.graphdef_of(model),
                              optimizer=optimizer,
                              learning_rate=optim.learning_rate_schedule(optim_config(), 10),
                              clip_norm=optim_config().clip_norm, microbatches=1, z_loss=1e-4,
                              segment_mask=True, loss_chunks=2)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch())
  return step.lower(abstract, batch)


# The CPU's attention (reference) and the memory-efficient one, with tiny's remat policy.
@pytest.mark.parametrize('attention', ['reference', 'blockwise'])
def test_every_bfloat16_product_of_the_cpu_step_returns_float32(attention):
  """XLA:CPU runs bfloat16 x bfloat16 at its fast (AMX / AVX-512 BF16) rate only when the
  product returns float32; a bfloat16 result, or a float32 x bfloat16 product (autodiff's
  transpose of a float32-returning one), takes a slower path."""
  model = dataclasses.replace(MODEL, dtype='bfloat16', attention=attention, remat='save_dots')
  types = hlo.dot_types(lowered_step(model).as_text(dialect='hlo'))
  bfloat16_products = [t for t in types if t[:2] == ('bf16', 'bf16')]
  # forward, backward and recomputed projections, attention and the loss: dozens of them
  assert len(bfloat16_products) > 20
  assert {t[2] for t in bfloat16_products} == {'f32'}
  assert not [t for t in types if 'bf16' in t[:2] and t[0] != t[1]]  # no mixed products
  if attention == 'reference':  # (blockwise's backward forms one float32 x float32 row sum)
    assert set(types) == {('bf16', 'bf16', 'f32')}


# The whole model trained, and LoRA adapters on every projection of a frozen one.
@pytest.mark.parametrize(
    'adapters',
    [lora.LoRAConfig(), lora.LoRAConfig(rank=4, targets=lora.TARGETS)])
def test_xla_keeps_every_product_of_the_compiled_cpu_step_in_bfloat16(adapters):
  """After XLA:CPU's passes too, every product is bfloat16 x bfloat16 -> float32: none was
  upcast for an operand in a layout its fast kernels do not take (the weight gradients,
  which contract the token axis, and the products of transposed attention operands were,
  16 of 37, before the operands were laid out for them; some of the adapters' were
  upcast to float32 x float32 before they went through projection.project)."""
  model = dataclasses.replace(MODEL, dtype='bfloat16', attention='reference', remat='save_dots',
                              lora=adapters)
  types = hlo.dot_types(lowered_step(model).compile().as_text())
  assert len(types) > 20
  assert set(types) == {('bf16', 'bf16', 'f32')}


def test_library_product_equals_einsum_in_float32():
  """Operands moved into [batch, kept, contracted] x [batch, contracted, kept], swapped
  when the output lists the second operand's axes first: the same product."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.bfloat16)
  y = jnp.asarray(rng.normal(size=(2, 3, 6, 5)), jnp.bfloat16)
  for subscripts in ['bqkh,bksq->bkhs', 'bqkh,bksq->bksh']:
    got = jax.jit(lambda x, y, s=subscripts: cpu_products.library_product(s, x, y))(x, y)
    want = np.einsum(subscripts, np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='must list the batch axes'):
    cpu_products.library_product('bqkh,bksq->bhks', x, y)


def test_float32_einsum_gradients_equal_autodiff():
  """The custom VJP against autodiff of jnp.einsum, in float32 arithmetic on bfloat16 values."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.bfloat16)
  y = jnp.asarray(rng.normal(size=(2, 3, 6, 4)), jnp.bfloat16)
  d_out = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.bfloat16)  # bfloat16 like the step's
  subscripts = 'bkqh,bksh->bkqs'
  out, vjp = jax.vjp(lambda x, y: cpu_products.einsum(subscripts, x, y), x, y)
  want_out, want_vjp = jax.vjp(lambda x, y: jnp.einsum(subscripts, x, y), x.astype(jnp.float32),
                               y.astype(jnp.float32))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), want_out, rtol=1e-2, atol=1e-2)
  for got, want in zip(vjp(d_out), want_vjp(d_out.astype(jnp.float32))):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-2, atol=2e-2)


def loss_and_grads(model, params, batch):
  graphdef = steps.graphdef_of(model)

  def mean_loss(params):
    loss, weight, _ = steps.token_losses(params, graphdef, batch, 1e-4, True, 2)
    return loss / weight

  return jax.jit(jax.value_and_grad(mean_loss))(params)


# Two compiles (33 s on the loaded 2-core machine); the VJP formulas are checked cheaply above.
@pytest.mark.slow
def test_bfloat16_loss_and_gradients_stay_close_to_float32():
  """Same float32 parameters, bfloat16 compute: one rounding of 2^-9 (relative) per cast, a
  few dozen casts deep in this 2-layer model: about 1% seen (float32 products or not); a lost
  or mis-scaled gradient term would be off by 100%."""
  params = nnx.state(model_lib.Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
  batch = make_batch()
  want_loss, want_grads = loss_and_grads(MODEL, params, batch)
  loss, grads = loss_and_grads(dataclasses.replace(MODEL, dtype='bfloat16'), params, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=5e-3)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(want_grads)):
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < 0.03, (jax.tree_util.keystr(path), error)


def test_benchmarks_name_the_cpu_matrix_extensions(tmp_path):
  from benchmarks import train_step
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n')
  assert train_step.cpu_matrix_extensions(str(cpuinfo)) == 'AMX, AVX-512 BF16'
  cpuinfo.write_text('flags\t\t: fpu avx2 avx512f\n')
  assert train_step.cpu_matrix_extensions(str(cpuinfo)) == 'no AMX or AVX-512 BF16'
