"""Reading compiled HLO: collectives per step (loops counted by their trip count), arrays."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax import hlo


def test_collectives_count_every_loop_iteration():
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))

  def per_device(x):  # x: [1, 1024] float32 on each of 8 devices
    def body(carry, _):  # 5 iterations x 1 all-reduce of 4 KiB
      return carry + jax.lax.psum(carry, 'x'), None

    x = jax.lax.scan(body, x, None, length=5)[0]
    return jax.lax.all_gather(x, 'x', tiled=True)  # once: [8, 1024] float32

  step = jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=P('x'), out_specs=P(), check_vma=False))
  text = step.lower(jnp.ones((8, 1024))).compile().as_text()
  counts = hlo.collectives(text)
  assert counts['all-reduce'] == (5, 5 * 1024 * 4)
  assert counts['all-gather'] == (1, 8 * 1024 * 4)
  assert counts['all-to-all'] == (0, 0)


def test_largest_arrays():
  text = jax.jit(lambda x: jnp.outer(x, x).sum()).lower(jnp.ones(300)).compile().as_text()
  assert hlo.largest_arrays(text, 1) == [(300 * 300 * 4, 'f32[300,300]')]
