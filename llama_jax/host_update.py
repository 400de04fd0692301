"""The optimizer update of state held in host memory, streamed a layer at a time.

With the float32 master copy or the Adam moments in host memory (optim.master_memory /
optim.state_memory = host, JAX's `pinned_host`), moving the whole tree to the device for
the update would hold all of it there at once, and the device's peak would not drop. So
the update runs in a loop over the layer stack instead: each iteration brings one layer's
slices of the stacked `[layers, ...]` leaves to the device, updates them, and writes them
back into the host buffers in place (a dynamic-update-slice of the donated buffer). The
device holds one layer's state at a time. The leaves outside the stack (embeddings, output,
final norm) are updated whole in one pass.

Every update is the same optax update as on the device, on a part of each tree: the parts
keep the trees' structure, with the leaves that belong to the other part cut to zero
length, and the optimizer's step counts (scalars) in both parts. The gradients are clipped
by their global norm first, so the optimizer's own clipping, which sees only one part's
norm, never triggers.
"""

import jax
import jax.numpy as jnp
import optax

from llama_jax import optim


def _in_layer_stack(path) -> bool:
  return any(getattr(key, 'key', None) == 'layers' for key in path)


def _part(tree, layer):
  """`tree` with the leaves of one part: layer=None the leaves outside the layer stack
  (stacked leaves cut to length 0), else layer `layer` of the stacked leaves as [1, ...]
  (the others cut to length 0). Scalars are in both."""
  def cut(path, x):
    if x.ndim == 0:
      return x
    if _in_layer_stack(path) == (layer is None):
      return x[:0]
    return x if layer is None else jax.lax.dynamic_slice_in_dim(x, layer, 1)

  return jax.tree_util.tree_map_with_path(cut, tree)


def _to_device(tree):
  return jax.device_put(tree, jax.memory.Space.Device)


def update(optimizer, grads, grad_norm, clip_norm: float, params, opt_state, master, finite,
           on_host):
  """The new (params, opt_state, master) after one update with `grads` (whose global norm
  is `grad_norm`); on_host: the fields ('master', 'opt_state') in host memory. A
  non-finite step (`finite` false) keeps every old value. `master` is empty when the
  update goes into the params."""
  def update_part(grads, params, opt_state, master):  # one part of each tree, on the device
    opt_state, master = _to_device(opt_state), _to_device(master)
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

  trees = (grads, params, opt_state, master)
  rest = update_part(*_part(trees, None))  # embeddings, output, norm, step counts: whole

  in_host_memory = (False, 'opt_state' in on_host, 'master' in on_host)

  def update_layer(layer, stacked):  # stacked: (params, opt_state, master), whole trees
    new = update_part(*_part((grads, *stacked), layer))

    def write(path, buffer, value):
      if not _in_layer_stack(path) or buffer.ndim == 0:
        return buffer
      return jax.lax.dynamic_update_slice_in_dim(buffer, value, layer, 0)

    return tuple(
        jax.tree_util.tree_map_with_path(
            write, buffer,
            jax.device_put(value, jax.memory.Space.Host) if host else value)
        for buffer, value, host in zip(stacked, new, in_host_memory))

  layer_leaves = [
      x for path, x in jax.tree_util.tree_leaves_with_path(params) if _in_layer_stack(path)
  ]
  stacked = (params, opt_state, master)
  if layer_leaves:
    stacked = jax.lax.fori_loop(0, layer_leaves[0].shape[0], update_layer, stacked)

  def merge(path, layered, whole):
    return layered if _in_layer_stack(path) and layered.ndim else whole

  return tuple(
      jax.tree_util.tree_map_with_path(merge, layered, whole)
      for layered, whole in zip(stacked, rest))
