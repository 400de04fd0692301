"""The optimizer update of state held in host memory, streamed a slice at a time.

With the float32 master copy or the Adam moments in host memory (optim.master_memory /
optim.state_memory = host, JAX's `pinned_host`), moving the whole tree to the device for
the update would hold all of it there at once, and the device's peak would not drop. So
the update runs in loops instead: one over the layer stack, a layer at a time, and, on
one device, one for each other parameter larger than a layer (a large vocabulary's
embedding and output), in slices no larger than a layer. Each iteration brings one slice
of the parameters, gradients, master and moments to the device, updates it, and writes it
back into the host buffers in place (a dynamic-update-slice of the donated buffer). The
rest (norm scales, step counts, and on a mesh the parameters outside the stack) is
updated whole, once.

Every update is the same optax update as on the device, on a part of each tree: the parts
keep the trees' structure, with the leaves outside the part cut to zero length, and the
optimizer's step counts (scalars) in every part (only the whole part's are kept). The
gradients are clipped by the whole tree's norm first, so the optimizer's own clipping,
which sees one part's norm, does not clip again.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from llama_jax import optim


@dataclasses.dataclass(frozen=True)
class Stream:
  """Leaves updated in a loop, each cut into `slices` equal pieces along `axis`."""
  names: frozenset  # the leaves' parameter names (see _name)
  axis: int
  slices: int


def _name(path) -> tuple:
  """A parameter's name (its dict keys), the same in params, grads, master and moments."""
  return tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))


def _splits(sharding, ndim: int) -> list[int]:
  """How many pieces the mesh cuts each axis of an array with this NamedSharding into."""
  entries = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  sizes = []
  for entry in entries:
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    sizes.append(math.prod(sharding.mesh.shape[name] for name in names))
  return sizes


# TPUs write slices into host memory in whole tiles: never along an array's last (lane)
# axis, and along its second-to-last (sublane) axis in multiples of the tile's rows (8
# float32, 16 bfloat16 rows).
SUBLANE_ROWS = 16


def _slices(x, axis: int, at_most: int) -> int | None:
  """The fewest slices along `axis` that divide it, writable as whole tiles, and hold at
  most `at_most` elements each (else the most there are); None if the axis has none."""
  if axis == x.ndim - 1:
    return None
  counts = [
      d for d in range(2, x.shape[axis] + 1)
      if x.shape[axis] % d == 0 and (axis != x.ndim - 2 or x.shape[axis] // d % SUBLANE_ROWS == 0)
  ]
  fitting = [d for d in counts if x.size // d <= at_most]
  return (fitting or counts[-1:] or [None])[0]


def streams(params, param_shardings) -> list[Stream]:
  """The layer stack a layer at a time (the leaves of three or more axes; the norm scales,
  [layers, embed], are small and updated whole), then every other parameter larger than
  one layer that the mesh does not split (one device), in slices no larger than a layer."""
  leaves = [(_name(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params)]
  stacked = {name: x for name, x in leaves if name[:1] == ('layers',) and x.ndim > 2}
  layers = {x.shape[0] for x in stacked.values()}
  if len(layers) > 1:
    raise ValueError(f'the layer stack has leaves of {sorted(layers)} layers; expected one.')
  found = [Stream(frozenset(stacked), 0, layers.pop())] if stacked else []
  layer_size = sum(x.size for x in stacked.values()) // (found[0].slices if found else 1)
  shardings = {
      _name(path): s for path, s in jax.tree_util.tree_leaves_with_path(
          param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  }
  for name, x in leaves:
    # Only parameters the mesh leaves whole: a TPU may lay a sharded one out with its first
    # axis minor (seen for an embedding under fsdp), and no slice of that can be written.
    if name[:1] == ('layers',) or x.size <= layer_size or max(_splits(shardings[name], x.ndim)) > 1:
      continue
    for axis in range(x.ndim):
      slices = _slices(x, axis, layer_size)
      if slices:
        found.append(Stream(frozenset([name]), axis, slices))
        break
  return found


def _part(tree, stream: Stream | None, index, rest: frozenset):
  """`tree` with one part's leaves: slice `index` of the stream's leaves (stream given), or
  the leaves of no stream (`rest`: every streamed name). Others are cut to length 0."""
  def cut(path, x):
    if x.ndim == 0:
      return x
    name = _name(path)
    if stream is not None and name in stream.names:
      size = x.shape[stream.axis] // stream.slices
      return jax.lax.dynamic_slice_in_dim(x, index * size, size, stream.axis)
    if stream is None and name not in rest:
      return x
    return x[:0]

  return jax.tree_util.tree_map_with_path(cut, tree)


def update(optimizer, grads, grad_norm, clip_norm: float, state, finite, on_host, param_shardings):
  """The new (params, opt_state, master) of `state` after one update with `grads` (whose
  global norm is `grad_norm`); on_host: the fields ('master', 'opt_state') in host
  memory; param_shardings: the params' NamedShardings. A non-finite step (`finite`
  false) keeps every old value. `state.master` is empty when the update goes into the
  params."""
  def update_part(grads, params, opt_state, master):  # one part of each tree
    opt_state = jax.device_put(opt_state, jax.memory.Space.Device)
    master = jax.device_put(master, jax.memory.Space.Device)
    # optax.clip_by_global_norm's formula, with the norm of the whole tree
    clipped = jax.tree.map(lambda g: jnp.where(grad_norm < clip_norm, g, g / grad_norm * clip_norm),
                           optim.cast(grads, jnp.float32))
    weights = master if master else optim.cast(params, jnp.float32)
    updates, new_opt_state = optimizer.update(clipped, opt_state, weights)
    weights = optax.apply_updates(weights, updates)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    new_params = jax.tree.map(lambda new, old: keep_if_bad(new.astype(old.dtype), old), weights,
                              params)
    new_master = jax.tree.map(keep_if_bad, weights, master) if master else master
    return new_params, jax.tree.map(keep_if_bad, new_opt_state, opt_state), new_master

  fields = (state.params, state.opt_state, state.master)
  in_host_memory = (False, 'opt_state' in on_host, 'master' in on_host)
  plan = streams(state.params, param_shardings)
  streamed = frozenset().union(*(stream.names for stream in plan))
  whole = update_part(*_part((grads, *fields), None, 0, streamed))

  for stream in plan:

    def update_slice(index, fields, stream=stream):
      new = update_part(*_part((grads, *fields), stream, index, streamed))

      def write(path, buffer, value):
        if buffer.ndim == 0 or _name(path) not in stream.names:
          return buffer
        size = buffer.shape[stream.axis] // stream.slices
        return jax.lax.dynamic_update_slice_in_dim(buffer, value, index * size, stream.axis)

      return tuple(
          jax.tree_util.tree_map_with_path(
              write, buffer,
              jax.device_put(value, jax.memory.Space.Host) if host else value)
          for buffer, value, host in zip(fields, new, in_host_memory))

    fields = jax.lax.fori_loop(0, stream.slices, update_slice, fields)

  def merge(path, streamed_value, whole_value):
    return streamed_value if streamed_value.ndim and _name(path) in streamed else whole_value

  return tuple(
      jax.tree_util.tree_map_with_path(merge, new, whole_new)
      for new, whole_new in zip(fields, whole))
