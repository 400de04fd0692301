"""Reading compiled HLO: collectives per step (loops counted by their trip count), arrays."""

import jax
import jax.numpy as jnp
import pytest
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


def test_dot_flops_count_loops_by_trip_count_and_refuse_a_bound_known_at_run_time():
  x = jnp.ones((16, 32))
  w = jnp.ones((32, 32))

  def static(x):  # 3 iterations of a [16, 32] x [32, 32] matmul
    return jax.lax.fori_loop(0, 3, lambda i, x: x @ w, x)

  text = jax.jit(static).lower(x).compile().as_text()
  assert hlo.dot_flops(text) == 3 * 2 * 16 * 32 * 32

  def dynamic(x, n):  # n iterations, n known at run time only
    return jax.lax.fori_loop(0, n, lambda i, x: x @ w, x)

  text = jax.jit(dynamic).lower(x, 3).compile().as_text()
  with pytest.raises(ValueError, match='no trip count'):
    hlo.dot_flops(text)


def test_dot_flops_read_the_convolutions_a_tpu_writes_matmuls_as():
  """libtpu, compile only: a matmul and a batched einsum (batch dimensions become spatial
  ones with holes) count exactly their 2 x multiply-adds."""
  from llama_jax import aot
  device = jax.sharding.SingleDeviceSharding(aot.topology_devices('v5p-8')[1][0])
  shapes = [(64, 256), (256, 512), (4, 64, 3, 32), (4, 128, 3, 32)]

  def matmuls(x, w, q, k):
    return x @ w, jnp.einsum('bqhd,bkhd->bhqk', q, k)

  text = jax.jit(matmuls, in_shardings=(device,) * 4).lower(
      *[jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]).compile().as_text()
  assert ' convolution(' in text
  assert hlo.dot_flops(text) == 2 * 64 * 256 * 512 + 2 * 4 * 3 * 64 * 128 * 32


def test_a_profiles_leaf_events_are_named_by_the_hlo_and_a_matmul_is_a_matmul(tmp_path):
  from benchmarks import step_profile  # pylint: disable=import-outside-toplevel

  # a chain of products (one per scan step) and a transpose
  def products(a, b):
    out, _ = jax.lax.scan(lambda x, _: (jnp.tanh(x @ b), None), a, None, length=3)
    return out, a.T

  a = jnp.ones((512, 512), jnp.float32)
  compiled = jax.jit(products).lower(a, a).compile()
  named = hlo.instructions(compiled.as_text())
  jax.block_until_ready(compiled(a, a))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  jax.block_until_ready(compiled(a, a))
  jax.profiler.stop_trace()
  leaves = step_profile.leaf_events(str(tmp_path))
  assert leaves and all(e['args']['hlo_op'] in named for e in leaves)
  assert not any(named[e['args']['hlo_op']].opcode == 'while' for e in leaves)
  categories = [named[e['args']['hlo_op']].category for e in leaves]
  assert categories.count('matmul') >= 3  # the product of each scan step
  assert 'layout copy' in categories  # the transpose


def test_time_an_instruction_is_in_flight_but_no_event_runs_is_charged_to_it():
  """Worked by hand: a (0-10, done at 30) and c (2-6, done at 20) are both in flight over
  10-20 (5 each), a alone over 20-30; nothing over 30-40; b runs 40-50."""
  from benchmarks import step_profile  # pylint: disable=import-outside-toplevel
  event = lambda ts, dur, end: {'ts': ts, 'dur': dur, 'end': end}
  times, idle = step_profile.attributed_us([event(0, 10, 30), event(2, 4, 20), event(40, 10, 50)])
  assert times == [25, 9, 10] and idle == 10
