"""bfloat16 products on a CPU that accumulate and return float32, forward and backward.

XLA:CPU multiplies bfloat16 matrices at its fast rate (oneDNN / AMX / AVX-512 BF16
kernels) only when the product returns float32; a bfloat16 result takes a path 2-4x
slower (docs/cpu_bfloat16.md). Autodiff of a float32-returning product would make the
backward products float32 x bfloat16, the upcast path, so `einsum` here has its own VJP
whose backward products are bfloat16 x bfloat16 -> float32 as well. On TPU and GPU, and
for float32 operands, it is plain `jnp.einsum`.
"""

import functools

import jax
import jax.numpy as jnp

from llama_jax.sharding import compute_platform


def einsum(subscripts: str, x, y, preferred_element_type=None):
  """jnp.einsum('ab,bc->ac'-style, two operands) returning `preferred_element_type`
  (default: the operands' dtype); on CPU, low-precision products accumulate in float32.

  Every index of each operand must appear in the other operand or in the output (a
  contraction, batch or kept axis), as in a matmul.
  """
  low_precision = x.dtype == y.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
  if compute_platform() != 'cpu' or not low_precision:
    return jnp.einsum(subscripts, x, y, preferred_element_type=preferred_element_type)
  return _float32_einsum(subscripts, x, y).astype(preferred_element_type or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _float32_einsum(subscripts, x, y):
  return jnp.einsum(subscripts, x, y, preferred_element_type=jnp.float32)


def _forward(subscripts, x, y):
  return _float32_einsum(subscripts, x, y), (x, y)


def _backward(subscripts, residuals, d_out):
  """d_x = d_out . y and d_y = x . d_out, each bfloat16 x bfloat16 -> float32."""
  x, y = residuals
  inputs, out = subscripts.replace(' ', '').split('->')
  x_axes, y_axes = inputs.split(',')
  d_out = d_out.astype(x.dtype)
  d_x = jnp.einsum(f'{out},{y_axes}->{x_axes}', d_out, y, preferred_element_type=jnp.float32)
  d_y = jnp.einsum(f'{x_axes},{out}->{y_axes}', x, d_out, preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_y.astype(y.dtype)


_float32_einsum.defvjp(_forward, _backward)
