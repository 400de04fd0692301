"""x @ W, the model's matmul of activations by a weight (and of LoRA's adapters), as each
platform runs it fastest."""

import math

import jax.numpy as jnp

from llama_jax import cpu_products
from llama_jax.sharding import compute_platform


def project(x, w, contract: int = 1, out_dtype=None):
  """Contracts x's last `contract` axes with w's first ones: [batch, length, *in] @ [*in, *out].

  On TPU and GPU one dot_general over the unflattened axes, so a length axis split over
  `sequence` stays split; flattening [batch, length] there costs all-to-alls and memory
  (docs/model.md). On CPU one 2-D matmul [batch * length, in] @ [in, out]: XLA:CPU's
  backward of the batched form transposes activations inside fusions (1.4x slower); in
  bfloat16 its products, forward and backward, accumulate in float32 (cpu_products.py).
  """
  if compute_platform() != 'cpu':
    return jnp.tensordot(x, w, axes=contract, preferred_element_type=out_dtype)
  lead, inner, outer = x.shape[:-contract], x.shape[-contract:], w.shape[contract:]
  y = cpu_products.einsum('ti,io->to', x.reshape(math.prod(lead), math.prod(inner)),
                          w.reshape(math.prod(inner), -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *outer)
