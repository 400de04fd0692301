"""Context parallelism: causal attention when the mesh splits the sequence (`length`) axis.

Load-balanced ("zigzag") layout: the sequence is cut into 2N chunks of C tokens; chip r of
the N along `sequence` holds chunks r and 2N-1-r, one early and one late, so every chip
has the same causal work. The train step puts its batch (tokens, positions, segment ids,
targets, weights) in this layout with `to_layout` before the model sees it; every layer
but attention works token by token and the loss is a sum over tokens, so the numbers are
those of the natural order. Nothing else (data pipeline, checkpoints) sees the layout.

Each chip keeps its own queries [A; B] (chunks r and 2N-1-r) and visits the keys and values
of every chip t = r - s (mod N) in steps s = 0..N-1, attending only to what it may see:

  s = 0   its own two chunks: causal attention over its 2C tokens (A precedes B);
  t < r   both query chunks see all of t's early chunk, none of its late one;
  t > r   only the late chunk B sees t's two chunks, all of them.

Every step after the first is 2C x C scores, so each chip computes 1/N of the causal
attention of the whole sequence (each step's computation: partial_attention.py, for
reference, blockwise and triton; splash runs below). The partial outputs merge by their
log-sum-exp. Keys and
values (`kv_heads` of them, never the repeated query heads) arrive by one all-gather
(`all_gather`) or one chip to the next with ppermute (`ring`), each transfer issued a step
ahead so that it overlaps the step's computation; the backward pass sends the key/value
gradients the same way back (a reduce-scatter, or accumulators passed along the ring).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import attention as attention_lib
from llama_jax import partial_attention
from llama_jax import sharding as sharding_lib

MODES = ('all_gather', 'ring')


def _mesh_axes(logical_name, rules) -> tuple[str, ...]:
  """The mesh axes that split an activation axis (`length`: the sequence axes)."""
  axes = sharding_lib.logical_to_mesh((logical_name,), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def sequence_shards() -> int:
  """How many pieces the sequence is split into on the mesh in context (1 outside one)."""
  mesh_and_rules = sharding_lib.current_mesh_and_rules()
  if mesh_and_rules is None:
    return 1
  mesh, rules = mesh_and_rules
  return int(np.prod([mesh.shape[axis] for axis in _mesh_axes('length', rules)]))


def chunk_order(shards: int) -> np.ndarray:
  """The natural chunk held at each place of the layout: 0, 2N-1, 1, 2N-2, ..."""
  return np.array([c for r in range(shards) for c in (r, 2 * shards - 1 - r)])


def _reorder(x, shards, order):
  batch, length = x.shape[:2]
  chunks = x.reshape(batch, len(order), length // len(order), *x.shape[2:])
  return jnp.take(chunks, order, axis=1).reshape(x.shape)


def to_layout(tree, shards: int):
  """Every [batch, length, ...] array of `tree`, natural order -> load-balanced layout."""
  if shards == 1:
    return tree
  return jax.tree.map(lambda x: _reorder(x, shards, chunk_order(shards)), tree)


def from_layout(tree, shards: int):
  """The inverse of `to_layout`."""
  if shards == 1:
    return tree
  return jax.tree.map(lambda x: _reorder(x, shards, np.argsort(chunk_order(shards))), tree)


# ---------------------------------------------------------------------------
# The steps on one chip, under shard_map.


def _merge(out_a, lse_a, out_b, lse_b):
  """Two partial attentions over disjoint keys -> the attention over both."""
  lse = jnp.logaddexp(lse_a, lse_b)
  finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
  weight = lambda part: jnp.exp(part - finite)[..., None]  # 0 where part is -inf
  return weight(lse_a) * out_a + weight(lse_b) * out_b, lse


def _visit(forward, t, r, q, seg, kv):
  """Partial attention of the local queries to chip t's keys and values (t != r)."""
  k, v, kv_seg = kv
  chunk = q.shape[1] // 2

  def early_chunk():  # t < r: every local query sees t's early chunk
    return forward(q, k[:, :chunk], v[:, :chunk], seg, kv_seg[:, :chunk], False)

  def both_chunks():  # t > r: the late query chunk sees both of t's chunks
    out, lse = forward(q[:, chunk:], k, v, seg[:, chunk:], kv_seg, False)
    return (jnp.concatenate([jnp.zeros_like(out), out],
                            1), jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], 1))

  return jax.lax.cond(t < r, early_chunk, both_chunks)


def _visit_grads(grads, t, r, q, seg, kv, out, lse, d_out):
  """(d_q, d_k, d_v) of `_visit`: d_k, d_v for t's keys and values, float32."""
  k, v, kv_seg = kv
  chunk = q.shape[1] // 2

  def early_chunk():
    d_q, d_k, d_v = grads(q, k[:, :chunk], v[:, :chunk], seg, kv_seg[:, :chunk], False, out, lse,
                          d_out)
    pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], 1)
    return d_q, pad(d_k), pad(d_v)

  def both_chunks():
    late = slice(chunk, None)
    d_q, d_k, d_v = grads(q[:, late], k, v, seg[:, late], kv_seg, False, out[:, late], lse[:, late],
                          d_out[:, late])
    return jnp.concatenate([jnp.zeros_like(d_q), d_q], 1), d_k, d_v

  return jax.lax.cond(t < r, early_chunk, both_chunks)


class _Chip:
  """Where this chip is on the sequence axes, and how keys and values reach it."""
  def __init__(self, axes, shards):
    self.axes, self.shards = axes, shards
    self.index = jax.lax.axis_index(axes)

  def source(self, s):
    return (self.index - s) % self.shards

  def next_chip(self, x):  # ring: chip i sends to i + 1
    perm = [(i, (i + 1) % self.shards) for i in range(self.shards)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, self.axes, perm), x)

  def gather(self, x):
    return jax.tree.map(lambda a: jax.lax.all_gather(a, self.axes, axis=1, tiled=True), x)

  def piece(self, gathered, s):  # the keys and values chip `source(s)` holds
    length = gathered[0].shape[1] // self.shards
    return jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a,
                                               self.source(s) * length, length, 1), gathered)


def _forward_pass(step_fns, axes, shards, mode, q, k, v, seg):
  forward, _ = step_fns
  chip = _Chip(axes, shards)
  kv = (k, v, seg)
  if mode == 'ring':
    incoming = chip.next_chip(kv)  # issued before the local step, so it overlaps it
  else:
    gathered = chip.gather(kv)
  out, lse = forward(q, k, v, seg, seg, True)
  for s in range(1, shards):
    if mode == 'ring':
      kv = incoming
      if s + 1 < shards:
        incoming = chip.next_chip(kv)
    else:
      kv = chip.piece(gathered, s)
    out, lse = _merge(out, lse, *_visit(forward, chip.source(s), chip.index, q, seg, kv))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chip_attention(step_fns, axes, shards, mode, q, k, v, seg):
  """Local queries [batch, 2C, heads, head_dim] against the whole sequence's keys."""
  return _forward_pass(step_fns, axes, shards, mode, q, k, v, seg)[0].astype(q.dtype)


def _chip_attention_forward(step_fns, axes, shards, mode, q, k, v, seg):
  out, lse = _forward_pass(step_fns, axes, shards, mode, q, k, v, seg)
  return out.astype(q.dtype), (q, k, v, seg, out, lse)


def _chip_attention_backward(step_fns, axes, shards, mode, residuals, d_out):
  _, grads = step_fns
  q, k, v, seg, out, lse = residuals
  chip = _Chip(axes, shards)
  kv = (k, v, seg)
  if mode == 'ring':
    incoming = chip.next_chip(kv)
  else:
    gathered = chip.gather(kv)
  d_q, d_k, d_v = grads(q, k, v, seg, seg, True, out, lse, d_out)
  if mode == 'ring':  # (d_k, d_v) of the keys and values in hand travel with them
    d_kv = (d_k, d_v)
  else:  # [batch, whole length, kv_heads, head_dim] in the gathered order
    length = k.shape[1]
    d_kv_all = jax.tree.map(
        lambda x: jnp.zeros((x.shape[0], length * shards, *x.shape[2:]), x.dtype), (d_k, d_v))
    d_kv_all = jax.tree.map(
        lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, chip.index * length, 1), d_kv_all,
        (d_k, d_v))
  for s in range(1, shards):
    if mode == 'ring':
      kv, d_kv = incoming, chip.next_chip(d_kv)
      if s + 1 < shards:
        incoming = chip.next_chip(kv)
    else:
      kv = chip.piece(gathered, s)
    d_q_s, d_k_s, d_v_s = _visit_grads(grads, chip.source(s), chip.index, q, seg, kv, out, lse,
                                       d_out)
    d_q = d_q + d_q_s
    if mode == 'ring':
      d_kv = (d_kv[0] + d_k_s, d_kv[1] + d_v_s)
    else:
      start = chip.source(s) * length
      d_kv_all = jax.tree.map(
          lambda a, x: jax.lax.dynamic_update_slice_in_dim(
              a,
              jax.lax.dynamic_slice_in_dim(a, start, length, 1) + x, start, 1), d_kv_all,
          (d_k_s, d_v_s))
  if mode == 'ring':
    d_k, d_v = chip.next_chip(d_kv)  # home: chip r + 1's accumulators went round the ring
  else:
    d_k, d_v = jax.tree.map(
        lambda a: jax.lax.psum_scatter(a, axes, scatter_dimension=1, tiled=True), d_kv_all)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_chip_attention.defvjp(_chip_attention_forward, _chip_attention_backward)

# ---------------------------------------------------------------------------
# Splash: the kernel itself splits the queries (`q_seq_shards`) and skips the masked
# blocks; each chip passes its own queries and all keys and values, gathered and put back
# in the natural order, and the mask reads each query row's natural index.


@functools.lru_cache(maxsize=8)
def _load_balanced_causal_mask(length, shards):
  """Splash's causal mask for queries in the load-balanced layout, keys in natural order.

  Cached, so that every layer's kernel finds splash's own cache of the processed mask."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  class LoadBalancedCausalMask(masks.CausalMask):
    """Splash reads every (query block, key block) of the mask when it builds its block
    map; a block whose rows' natural indices all precede (or all follow) its keys is
    answered whole here instead of element by element (that took minutes at 131072
    tokens, most of an hour at 524288). The kernel reads only `q_sequence`."""
    def __getitem__(self, idx):
      q_slice, kv_slice = idx
      rows = self.q_sequence[q_slice]
      kv_start, kv_stop, _ = kv_slice.indices(self.shape[1])
      if rows.min() >= kv_stop - 1:
        return _constant_block(len(rows), kv_stop - kv_start, True)
      if rows.max() < kv_start:
        return _constant_block(len(rows), kv_stop - kv_start, False)
      return super().__getitem__(idx)

  mask = LoadBalancedCausalMask((length, length))
  chunk = length // (2 * shards)
  mask.q_sequence = (chunk_order(shards)[:, None] * chunk + np.arange(chunk)).reshape(-1).astype(
      np.int32)  # the natural index of each row of the layout
  return mask


@functools.lru_cache(maxsize=4)
def _constant_block(rows, cols, value):
  block = np.full((rows, cols), value)
  block.flags.writeable = False
  return block


def _splash(q, k, v, segment_ids, *, mesh, rules, axes, shards, block, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  batch, length, heads, head_dim = q.shape
  heads_per_chip = heads // int(np.prod([mesh.shape[a] for a in _mesh_axes('act_heads', rules)]))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = masks.MultiHeadMask([_load_balanced_causal_mask(length, shards)] * heads_per_chip)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=shards,
                                  interpret=interpret)
  kernel_spec = kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes)))

  def run(kernel, q, k, v, seg):  # q [batch, 2C, heads, head_dim]: this chip's queries
    gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, axes, axis=1, tiled=True), (k, v, seg))
    k, v, kv_seg = from_layout(gathered, shards)  # the whole sequence, natural order
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    one_row = lambda q, k, v, q_seg, kv_seg: kernel(q, k, v, segment_ids=splash.SegmentIds(
        q_seg, kv_seg))
    out = jax.vmap(one_row)(heads_first(q * head_dim**-0.5), heads_first(k), heads_first(v), seg,
                            kv_seg)
    return heads_first(out)

  specs = sharding_lib.logical_to_mesh(('batch', 'length', 'act_heads', None), rules)
  segments = sharding_lib.logical_to_mesh(('batch', 'length'), rules)
  return jax.shard_map(run, mesh=mesh, in_specs=(kernel_spec, specs, specs, specs, segments),
                       out_specs=specs, check_vma=False)(kernel, q, k, v, segment_ids)


def attention(q, k, v, segment_ids=None, *, implementation: str, mode: str, block_size=None,
              interpret=False):
  """Causal self-attention of sequences in the load-balanced layout, split over the mesh in
  context: q [batch, length, heads, head_dim], k, v [batch, length, kv_heads, head_dim]."""
  mesh, rules = sharding_lib.current_mesh_and_rules()
  axes = _mesh_axes('length', rules)
  shards = sequence_shards()
  segments = segment_ids is not None
  if not segments:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  if implementation == 'splash':
    local = q.shape[1] // shards
    block = block_size or next(size for size in (512, 256, 128) if local % size == 0)
    return _splash(q, k, v, segment_ids, mesh=mesh, rules=rules, axes=axes, shards=shards,
                   block=block, interpret=interpret)
  chunk = q.shape[1] // (2 * shards)
  default_block = attention_lib.KERNEL_BLOCK if implementation == 'triton' else (
      attention_lib.BLOCKWISE_BLOCK)
  block = min(block_size or default_block, chunk)
  step_fns = partial_attention.step_functions(implementation, block=block, segments=segments,
                                              interpret=interpret)
  run = functools.partial(_chip_attention, step_fns, axes, shards, mode)
  heads = sharding_lib.logical_to_mesh(('batch', 'length', 'act_heads', None), rules)
  tokens = sharding_lib.logical_to_mesh(('batch', 'length'), rules)
  return jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, tokens), out_specs=heads,
                       check_vma=False)(q, k, v, segment_ids)
