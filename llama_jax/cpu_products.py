"""bfloat16 products on a CPU that accumulate and return float32, forward and backward.

XLA:CPU multiplies bfloat16 matrices at its fast rate (its YNNPACK kernels, on AMX or
AVX-512 BF16) only for a bfloat16 x bfloat16 -> float32 product whose operands are laid
out row-major as [batch, rows, contracted] and [batch, contracted, columns]; any other
product is upcast to float32 before the kernel sees it (docs/cpu_bfloat16.md). So here
every product, forward and backward, gets its operands in that form: each operand is
transposed into that order under a row-major layout constraint (without it XLA keeps a
transpose as a transposed layout or folds it into the product's dimension numbers, and
either is upcast; an operand already row-major in that order is left as it is).
Autodiff of a float32-returning product would make its backward products float32 x
bfloat16, also upcast, so `einsum` has its own VJP. On TPU and GPU, and for float32
operands, it is plain `jnp.einsum`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import layout

from llama_jax.sharding import compute_platform


def einsum(subscripts: str, x, y, preferred_element_type=None):
  """jnp.einsum('ab,bc->ac'-style, two operands) returning `preferred_element_type`
  (default: the operands' dtype); on CPU, low-precision products accumulate in float32.

  Every index must be a batch axis (in x, y and the output), a contracted one (in x and
  y only) or a kept one (in one operand and the output), and the output must list the
  batch axes first, then one operand's kept axes, then the other's, as in a matmul. The
  same holds for the two backward products, which the matmuls of a model satisfy.
  """
  low_precision = x.dtype == y.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
  if compute_platform() != 'cpu' or not low_precision:
    return jnp.einsum(subscripts, x, y, preferred_element_type=preferred_element_type)
  return _float32_einsum(subscripts, x, y).astype(preferred_element_type or x.dtype)


def library_product(subscripts: str, x, y):
  """x . y -> float32 as one product in the form XLA:CPU's fast kernels take (see the
  module docstring); `subscripts` as for `einsum`. Not differentiable."""
  inputs, out = subscripts.replace(' ', '').split('->')
  x_axes, y_axes = inputs.split(',')
  batch = ''.join(a for a in out if a in x_axes and a in y_axes)
  contracted = ''.join(a for a in x_axes if a in y_axes and a not in out)
  x_kept = ''.join(a for a in x_axes if a not in y_axes)
  y_kept = ''.join(a for a in y_axes if a not in x_axes)
  if out == batch + y_kept + x_kept:  # (a product is the same with its operands swapped)
    x, y, x_axes, y_axes, x_kept, y_kept = y, x, y_axes, x_axes, y_kept, x_kept
  if out != batch + x_kept + y_kept:
    raise ValueError(f'{subscripts!r}: the output must list the batch axes, then one '
                     "operand's kept axes, then the other's.")
  lhs = _row_major(x, x_axes, batch + x_kept + contracted)
  rhs = _row_major(y, y_axes, batch + contracted + y_kept)
  return jnp.einsum(f'{batch + x_kept + contracted},{batch + contracted + y_kept}->{out}', lhs, rhs,
                    preferred_element_type=jnp.float32)


def _row_major(array, axes: str, order: str):
  """`array` with its axes (named by `axes`) in `order`, stored row-major in that order
  (a copy only where XLA would otherwise hand the product a transposed layout, as it does
  for the result of a transpose before the product)."""
  moved = jnp.transpose(array, [axes.index(a) for a in order])
  return layout.with_layout_constraint(moved, layout.Layout(tuple(range(moved.ndim))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _float32_einsum(subscripts, x, y):
  return library_product(subscripts, x, y)


def _forward(subscripts, x, y):
  return _float32_einsum(subscripts, x, y), (x, y)


def _backward(subscripts, residuals, d_out):
  """d_x = d_out . y and d_y = x . d_out, each bfloat16 x bfloat16 -> float32."""
  x, y = residuals
  inputs, out = subscripts.replace(' ', '').split('->')
  x_axes, y_axes = inputs.split(',')
  d_out = d_out.astype(x.dtype)
  d_x = library_product(f'{out},{y_axes}->{x_axes}', d_out, y)
  d_y = library_product(f'{x_axes},{out}->{y_axes}', x, d_out)
  return d_x.astype(x.dtype), d_y.astype(y.dtype)


_float32_einsum.defvjp(_forward, _backward)
