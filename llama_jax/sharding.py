"""The device mesh, logical-axis rules, and the shardings of parameters and batches.

The model names the axes of every parameter and activation (`embed`, `heads`, `batch`,
`length`, ...); the config's rules map each name to mesh axes (`data`, `fsdp`, `sequence`,
`tensor`) or to None (replicated). Changing the parallelism layout is a config change.
"""

import math

import jax
from jax.experimental import mesh_utils
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')

# Logical axes of one batch array [batch, length].
BATCH_AXES = ('batch', 'length')

_context = None  # (mesh, rules) while a sharded step is traced; see activation_sharding


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, sequence, tensor); one of them may be -1: the remaining devices."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid; give positive '
                      'sizes with at most one -1 (fill with the remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % known:
      raise ConfigError(f'the mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the '
                        f'{device_count} devices; choose sizes whose product divides it.')
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise ConfigError(f'the mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                      f'devices but there are {device_count}; make the product of '
                      'config.mesh sizes equal the device count (or set one to -1).')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (all by default) laid out for the physical topology, auto axes.

  Across several TPU slices (multi-slice) the `data` axis spans the slices, so only
  data-parallel gradient reductions cross the slower data-center network.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(device, 'slice_index', 0) for device in devices})
  # Splitting physical axes lets e.g. tensor=2 x sequence=2 share one 4-chip torus axis.
  if slices == 1:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=axis_types)
  if shape[0] % slices:
    raise ConfigError(f'mesh.data ({shape[0]}) must be a multiple of the {slices} slices: '
                      'data parallelism is what runs across slices.')
  in_slice = (shape[0] // slices, *shape[1:])
  device_array = mesh_utils.create_hybrid_device_mesh(in_slice, (slices, 1, 1, 1), devices,
                                                      allow_split_physical_axes=True)
  return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=axis_types)


def logical_to_mesh(logical_axes, rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  Each entry is a name, None (replicated), or a tuple of names for an axis flattened from
  several (`('batch', 'length')` for [batch * length] tokens): it is split over the mesh
  axes of all of them, in order, so a reshape keeps every sharding it was made of. A mesh
  axis already used by an earlier entry is left out. A name with no rule is an error: a
  silent fallback to "replicated" would put a whole global activation on every chip.
  """
  rules, used, spec = dict(rules), set(), []
  for entry in logical_axes:
    mesh_axes = []
    for name in (entry if isinstance(entry, tuple) else (entry,)):
      if name is None:
        continue
      if name not in rules:
        raise ConfigError(f'the logical axis {name!r} has no rule in config.mesh.rules; add '
                          f"('{name}', None) to replicate it or map it to mesh axes.")
      axes = rules[name]
      mesh_axes += [axes] if isinstance(axes, str) else list(axes or ())
    mesh_axes = [axis for axis in dict.fromkeys(mesh_axes) if axis not in used]
    used.update(mesh_axes)
    if len(mesh_axes) > 1:
      spec.append(tuple(mesh_axes))
    else:
      spec.append(mesh_axes[0] if mesh_axes else None)
  return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for a pytree whose nnx.Variables carry logical axis names."""
  specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(BATCH_AXES, rules))


class activation_sharding:
  """Context manager: `constrain` inside it places activations on `mesh` by `rules`."""
  def __init__(self, mesh, rules):
    self.context = (mesh, dict(rules))

  def __enter__(self):
    global _context
    self.saved, _context = _context, self.context

  def __exit__(self, *exc):
    global _context
    _context = self.saved


def current_mesh_and_rules():
  """(mesh, rules) inside `activation_sharding`, else None."""
  return _context


def compute_platform() -> str:
  """The platform being traced for: the devices of the mesh in context (which may be a TPU
  topology compiled ahead of time on a CPU host), else JAX's default backend."""
  if _context is None:
    return jax.default_backend()
  return _context[0].devices.flat[0].platform


def constrain(x, logical_axes):
  """Constrains activation x to the mesh axes its logical axes map to (no-op outside)."""
  if _context is None:
    return x
  mesh, rules = _context
  return jax.lax.with_sharding_constraint(x,
                                          NamedSharding(mesh, logical_to_mesh(logical_axes, rules)))


def rows_of_process(sharding: NamedSharding, global_batch: int) -> range:
  """The batch rows whose data this process's devices hold (a contiguous range)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch, 1)).values():
    rows.update(range(global_batch)[index[0]])
  rows = sorted(rows)
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ConfigError('this process holds non-contiguous batch rows; order the mesh so '
                      'each process holds a contiguous block of the batch axes.')
  return range(rows[0], rows[-1] + 1)


def global_batch(local_batch: dict, sharding: NamedSharding, batch_size: int, rows: range) -> dict:
  """Assembles this process's rows [len(rows), length] into global jax.Arrays."""
  def assemble(local):
    def shard(index):  # index: (rows slice, length slice) of the global array
      start, stop, _ = index[0].indices(batch_size)
      return local[start - rows.start:stop - rows.start, index[1]]

    return jax.make_array_from_callback((batch_size,) + local.shape[1:], sharding, shard)

  return jax.tree.map(assemble, local_batch)
