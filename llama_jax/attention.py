"""Causal grouped-query attention behind one function, in several implementations.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim],
with `heads` a multiple of `kv_heads`. Query i may see key j when j <= i + q_offset
and, if segment ids are given, both carry the same segment id (packed documents).

Implementations (config key `model.attention`):
  reference  materializes the [q_len, kv_len] scores and mask; the yardstick for tests,
             the fastest on CPU (benchmarks/attention.py), and the one cached decoding uses.
  blockwise  memory-efficient pure JAX: an online softmax over key blocks, with a
             hand-written backward pass, so no [q_len, kv_len] array exists in the forward
             or the backward pass (the paper's "memory-optimized causal attention").
  splash     the Pallas TPU kernel (splash attention).
  triton     the Pallas GPU flash-attention kernel (jax.experimental.pallas.ops.gpu,
             lowered by Triton), with segment ids; key/value heads repeated for GQA.
  cudnn      cuDNN's fused flash attention (`jax.nn.dot_product_attention(...,
             implementation='cudnn')`): GPU only, bfloat16/float16, no segment ids.
  auto       the first of AUTO[platform] that handles the shape.

The three kernels run per device (shard_map over batch and heads) on a mesh, self-attention
only; the Pallas ones also run on a CPU in interpret mode, which is how the tests check them.
When the mesh splits the sequence, context_parallel.py runs reference, blockwise, splash and
triton on each chip's own queries; cudnn still attends whole sequences per device (its API
returns no log-sum-exp to merge partial results by).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import cpu_products
from llama_jax import sharding as sharding_lib
from llama_jax.errors import ConfigError

IMPLEMENTATIONS = ('auto', 'reference', 'blockwise', 'splash', 'triton', 'cudnn')
# What `auto` tries, in order, by platform; blockwise handles every self-attention shape.
AUTO = {
    'tpu': ('splash', 'blockwise'),
    'gpu': ('cudnn', 'triton', 'blockwise'),
    'cpu': ('reference',)
}
KERNEL_BLOCK = 128  # the Pallas kernels' block along the sequence
BLOCKWISE_BLOCK = 512

# Finite stand-in for -inf: keeps exp() and max() free of NaNs for fully masked rows.
_MASKED = -1e30


def unsupported(implementation: str, *, platform: str, length: int, head_dim: int, dtype,
                segments: bool, block: int = KERNEL_BLOCK) -> str | None:
  """Why `implementation` cannot run causal self-attention of this shape (None if it can)."""
  if implementation in ('splash', 'triton'):
    home = 'tpu' if implementation == 'splash' else 'gpu'
    if platform not in (home, 'cpu'):
      return f'runs on {home.upper()}s (and on a CPU in interpret mode, for tests)'
    if length % block:
      return f'needs a sequence length that is a multiple of {block}, not {length}'
  if implementation == 'cudnn':
    if platform != 'gpu':
      return 'runs on GPUs only'
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return f'needs model.dtype bfloat16 or float16, not {jnp.dtype(dtype).name}'
    if head_dim % 8 or head_dim > 128:
      return f'needs a head_dim (dim / n_heads) that is a multiple of 8 up to 128, not {head_dim}'
    if segments:
      return ('cannot keep attention inside packed documents; set data.segment_mask=False '
              'or use model.attention=triton')
    if not _cudnn_found():
      return ("needs the cuDNN library, which JAX does not find (pip install -e '.[gpu]' "
              'installs it)')
  return None


@functools.cache
def _cudnn_found() -> bool:
  from jax._src.cudnn import fused_attention_stablehlo  # JAX's own check (no public one)
  try:
    fused_attention_stablehlo.check_cudnn_version()
  except RuntimeError:  # "cuDNN not found."
    return False
  return True


def resolve_implementation(implementation: str, platform: str, *, length: int, head_dim: int, dtype,
                           segments: bool, block: int = KERNEL_BLOCK) -> str:
  """`auto` -> the implementation for this platform and shape; an explicit one that cannot
  run it raises ConfigError saying what would."""
  shape = dict(platform=platform, length=length, head_dim=head_dim, dtype=dtype, segments=segments,
               block=block)
  if implementation == 'auto':
    return next((name for name in AUTO.get(platform, ()) if not unsupported(name, **shape)),
                'blockwise')
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f'model.attention is {implementation!r}; use one of '
                      f'{", ".join(IMPLEMENTATIONS)}.')
  reason = unsupported(implementation, **shape)
  if reason:
    raise ConfigError(f'model.attention={implementation} {reason}; use model.attention=auto '
                      f'(here: {resolve_implementation("auto", **shape)}).')
  return implementation


def attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, implementation='reference',
              block_size=None, context_parallel='all_gather'):
  """Causal self-attention; returns [batch, q_len, heads, head_dim] in q's dtype.

  `block_size` overrides the blocks of blockwise and the Pallas kernels (tests use small ones).
  On a mesh whose `sequence` axis splits the length, the sequence is in the load-balanced
  layout of context_parallel.py and `context_parallel` (all_gather | ring) says how keys
  and values travel.
  """
  from llama_jax import context_parallel as context_lib  # (it builds on this module)
  platform, length, head_dim = sharding_lib.compute_platform(), q.shape[1], q.shape[-1]
  implementation = resolve_implementation(implementation, platform, length=length,
                                          head_dim=head_dim, dtype=q.dtype, segments=q_segment_ids
                                          is not None, block=block_size or KERNEL_BLOCK)
  shards = context_lib.sequence_shards()
  if shards > 1 and q.shape[1] == k.shape[1]:
    # Splash splits the queries itself, in whole blocks of each chip's share of the length;
    # triton runs on each chip's chunks, in whole blocks of a chunk.
    block, chunk = block_size or KERNEL_BLOCK, length // (2 * shards)
    splash_splits = implementation == 'splash' and length // shards % block == 0
    triton_splits = implementation == 'triton' and chunk % min(block, chunk) == 0
    if implementation in ('reference', 'blockwise') or splash_splits or triton_splits:
      return context_lib.attention(q, k, v, q_segment_ids, implementation=implementation,
                                   mode=context_parallel, block_size=block_size,
                                   interpret=platform == 'cpu')
    # The other kernels attend whole sequences per device, in the natural order.
    q, k, v, q_segment_ids, kv_segment_ids = context_lib.from_layout(
        (q, k, v, q_segment_ids, kv_segment_ids), shards)
    out = _whole_sequences(q, k, v, q_segment_ids, kv_segment_ids, implementation, block_size,
                           platform)
    return context_lib.to_layout(out, shards)
  return _whole_sequences(q, k, v, q_segment_ids, kv_segment_ids, implementation, block_size,
                          platform)


def _whole_sequences(q, k, v, q_segment_ids, kv_segment_ids, implementation, block_size, platform):
  length = q.shape[1]
  if implementation == 'reference':
    return reference_attention(q, k, v, q_segment_ids, kv_segment_ids)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f'{implementation} attention needs self-attention (q_len == kv_len).')
  if implementation == 'blockwise':
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, block_size or
                               BLOCKWISE_BLOCK)
  block = block_size or KERNEL_BLOCK
  if implementation == 'splash' and not block_size:  # the largest of its usual blocks
    block = next(size for size in (512, 256, 128) if length % size == 0)
  kernel = {'splash': _splash_kernel, 'triton': _triton_kernel, 'cudnn': _cudnn_kernel}
  return _per_device(kernel[implementation], q, k, v, q_segment_ids, block=block,
                     interpret=platform == 'cpu')


def causal_mask(q_len, kv_len, q_offset=0, q_segment_ids=None, kv_segment_ids=None):
  """Boolean mask [batch or 1, q_len, kv_len]: True where query i may see key j.

  q_offset: [] or [batch], the position of each row's first query.
  """
  q_index = jnp.arange(q_len)[None, :, None] + jnp.reshape(q_offset, (-1, 1, 1))
  kv_index = jnp.arange(kv_len)[None, None, :]
  mask = kv_index <= q_index
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def reference_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_offset=0):
  """Plain softmax(q k^T / sqrt(d) + mask) v with float32 scores.

  Heads go in front of the sequence, and the query heads sharing a key head are stacked
  into one [group * q_len, head_dim] matrix: on CPU this runs about 2x faster than an
  einsum over [batch, length, heads, head_dim] operands.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  q = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, group * q_len, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, kv_len, head_dim]
  # scores: [batch, kv_heads, group * q_len, kv_len]
  scores = cpu_products.einsum('bkqh,bksh->bkqs', q, k, preferred_element_type=jnp.float32)
  scores = scores * head_dim**-0.5
  mask = causal_mask(q_len, kv_len, q_offset, q_segment_ids, kv_segment_ids)
  scores = jnp.where(jnp.tile(mask, (1, group, 1))[:, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # out: [batch, kv_heads, group * q_len, head_dim]
  out = cpu_products.einsum('bkqs,bksh->bkqh', probs, v)
  out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, heads, head_dim)


# ---------------------------------------------------------------------------
# Blockwise (flash) attention: online softmax forward, recomputing backward.
# Internally queries are grouped per kv head: [batch, blocks, block, kv_heads, group, head_dim].


def blockwise_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, block_size=512):
  """Causal self-attention in O(length) memory; lengths need not divide the block size."""
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  block = min(block_size, length)
  n_blocks = -(-length // block)
  pad = n_blocks * block - length
  if q_segment_ids is None:
    q_segment_ids = kv_segment_ids = jnp.zeros((batch, length), jnp.int32)
  # Padded keys get segment -1 and padded queries -2: they never match anything real.
  q_seg = jnp.pad(q_segment_ids, ((0, 0), (0, pad)), constant_values=-2)
  kv_seg = jnp.pad(kv_segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  pad_len = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = pad_len(q).reshape(batch, n_blocks, block, kv_heads, heads // kv_heads, head_dim)
  k = pad_len(k).reshape(batch, n_blocks, block, kv_heads, head_dim)
  v = pad_len(v).reshape(batch, n_blocks, block, kv_heads, head_dim)
  q_seg = q_seg.reshape(batch, n_blocks, block)
  kv_seg = kv_seg.reshape(batch, n_blocks, block)
  out = _flash(q, k, v, q_seg, kv_seg)
  return out.reshape(batch, n_blocks * block, heads, head_dim)[:, :length]


def _block_mask(i, j, q_seg, kv_seg, causal=True):
  """[batch, 1, 1, block, block] mask between query block i and key block j."""
  mask = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    block = q_seg.shape[-1]
    q_index = i * block + jnp.arange(block)[:, None]
    kv_index = j * block + jnp.arange(block)[None, :]
    mask = mask & (kv_index <= q_index)[None]
  return mask[:, None, None]


def _block_probs(q_i, k_j, i, j, q_seg_i, kv_seg_j, lse_i, causal=True):
  """Recomputes the softmax probabilities [batch, kv_heads, group, block, block]."""
  scores = jnp.einsum('bqkgh,bskh->bkgqs', q_i, k_j, preferred_element_type=jnp.float32)
  scores = scores * q_i.shape[-1]**-0.5
  mask = _block_mask(i, j, q_seg_i, kv_seg_j, causal)
  return jnp.where(mask, jnp.exp(scores - lse_i[..., None]), 0.0)


@jax.custom_vjp
def _flash(q, k, v, q_seg, kv_seg):
  return _flash_forward(q, k, v, q_seg, kv_seg)[0]


def _visible_pairs(n_blocks, n_kv_blocks, causal):
  """(query block, key block) of every pair that may hold a visible score, query-major:
  causal, key blocks 0..i of query block i; else all. Static int32 arrays, so a loop over
  them has a trip count XLA knows (and `llama_jax.hlo` counts)."""
  i, j = np.meshgrid(np.arange(n_blocks), np.arange(n_kv_blocks), indexing='ij')
  visible = j <= i if causal else np.ones_like(i, bool)
  return jnp.asarray(i[visible], jnp.int32), jnp.asarray(j[visible], jnp.int32)


def _block(x, i):  # x[:, i]: block i of [batch, blocks, ...]
  return jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False)


def _add_to_block(x, i, update):  # x[:, i] += update
  return jax.lax.dynamic_update_index_in_dim(x, _block(x, i) + update, i, 1)


def _flash_forward(q, k, v, q_seg, kv_seg, causal=True):
  """Also the building block of context parallelism (context_parallel.py), which visits
  other chips' keys with causal=False: every query block then sees every key block.

  One loop over the visible (query block, key block) pairs, query-major: the online
  softmax state of the current query block starts afresh at its key block 0, and its
  output so far is written after every pair (the last write, after its last key block,
  is the final one)."""
  batch, n_blocks, block, kv_heads, group, head_dim = q.shape
  rows, cols = _visible_pairs(n_blocks, k.shape[1], causal)
  stats_shape = (batch, kv_heads, group, block)
  fresh_acc = jnp.zeros(stats_shape + (head_dim,), jnp.float32)
  fresh_max = jnp.full(stats_shape, _MASKED, jnp.float32)
  fresh = (fresh_acc, fresh_max, jnp.zeros(stats_shape, jnp.float32))  # acc, row max, row sum

  def pair(p, carry):
    out, lse, state = carry
    i, j = rows[p], cols[p]
    acc, row_max, row_sum = jax.tree.map(lambda x, init: jnp.where(j == 0, init, x), state, fresh)
    scores = jnp.einsum('bqkgh,bskh->bkgqs', _block(q, i), _block(k, j),
                        preferred_element_type=jnp.float32) * head_dim**-0.5
    mask = _block_mask(i, j, _block(q_seg, i), _block(kv_seg, j), causal)
    scores = jnp.where(mask, scores, _MASKED)
    new_max = jnp.maximum(row_max, scores.max(-1))
    probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
    correction = jnp.exp(row_max - new_max)
    row_sum = row_sum * correction + probs.sum(-1)
    acc = acc * correction[..., None] + jnp.einsum('bkgqs,bskh->bkgqh', probs.astype(v.dtype),
                                                   _block(v, j), preferred_element_type=jnp.float32)
    out_i = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    # Rows that see no key at all (padding) get lse=+inf, so their probabilities are 0.
    lse_i = jnp.where(row_sum > 0, new_max + jnp.log(row_sum), jnp.inf)
    out = jax.lax.dynamic_update_index_in_dim(out,
                                              out_i.transpose(0, 3, 1, 2, 4).astype(q.dtype), i, 1)
    return out, jax.lax.dynamic_update_index_in_dim(lse, lse_i, i, 1), (acc, new_max, row_sum)

  out = jnp.zeros(q.shape, q.dtype)  # [batch, n_blocks, block, kv_heads, group, head_dim]
  lse = jnp.full((batch, n_blocks, kv_heads, group, block), jnp.inf, jnp.float32)
  out, lse, _ = jax.lax.fori_loop(0, len(rows), pair, (out, lse, fresh))
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_backward(residuals, d_out):
  q, k, v = residuals[:3]
  d_q, d_k, d_v = _flash_grads(residuals, d_out)
  return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None)


def _flash_grads(residuals, d_out, causal=True):
  """Float32 (d_q, d_k, d_v); out and lse may be those of a longer row (context_parallel.py).

  One loop over the visible pairs: each recomputes its probabilities once and adds to the
  gradients of its query block and of its key and value blocks."""
  q, k, v, q_seg, kv_seg, out, lse = residuals
  rows, cols = _visible_pairs(q.shape[1], k.shape[1], causal)
  scale = q.shape[-1]**-0.5
  # delta_i = sum_h dO * O: [batch, n_blocks, kv_heads, group, block]
  delta = jnp.einsum('bnqkgh,bnqkgh->bnkgq', d_out.astype(jnp.float32), out.astype(jnp.float32))

  def pair(p, grads):
    d_q, d_k, d_v = grads
    i, j = rows[p], cols[p]
    q_i, k_j, d_out_i = _block(q, i), _block(k, j), _block(d_out, i)
    probs = _block_probs(q_i, k_j, i, j, _block(q_seg, i), _block(kv_seg, j), _block(lse, i),
                         causal)
    d_probs = jnp.einsum('bqkgh,bskh->bkgqs', d_out_i, _block(v, j),
                         preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - _block(delta, i)[..., None]) * scale
    d_q = _add_to_block(
        d_q, i,
        jnp.einsum('bkgqs,bskh->bqkgh', d_scores.astype(k.dtype), k_j,
                   preferred_element_type=jnp.float32))
    d_k = _add_to_block(
        d_k, j,
        jnp.einsum('bkgqs,bqkgh->bskh', d_scores.astype(q.dtype), q_i,
                   preferred_element_type=jnp.float32))
    d_v = _add_to_block(
        d_v, j,
        jnp.einsum('bkgqs,bqkgh->bskh', probs.astype(d_out.dtype), d_out_i,
                   preferred_element_type=jnp.float32))
    return d_q, d_k, d_v

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  return jax.lax.fori_loop(0, len(rows), pair, (zeros(q), zeros(k), zeros(v)))


_flash.defvjp(_flash_forward, _flash_backward)

# ---------------------------------------------------------------------------
# Kernels: one call per device on a mesh.


def _per_device(kernel, q, k, v, segment_ids, **options):
  """Runs kernel(q, k, v, segment_ids, **options) on each device's batch rows and heads.

  A kernel is a custom call XLA cannot split, so on a mesh it runs under shard_map: whole
  sequences per device (gathered if the sequence axis splits them), heads split over
  `tensor`. Outside a mesh it runs as is.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  run = lambda q, k, v, segment_ids: kernel(q, k, v, segment_ids, **options)
  mesh_and_rules = sharding_lib.current_mesh_and_rules()
  if mesh_and_rules is None:
    return run(q, k, v, segment_ids)
  mesh, rules = mesh_and_rules
  heads = sharding_lib.logical_to_mesh(('batch', None, 'act_heads', None), rules)
  segments = sharding_lib.logical_to_mesh(('batch', None), rules)
  return jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, segments), out_specs=heads,
                       check_vma=False)(q, k, v, segment_ids)


def _splash_kernel(q, k, v, segment_ids, *, block, interpret):
  """The Pallas TPU splash kernel: [heads, length, head_dim] per sequence, q pre-scaled."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  length, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.vmap(kernel)(heads_first(q * head_dim**-0.5), heads_first(k), heads_first(v),
                         segment_ids=splash.SegmentIds(q=segment_ids, kv=segment_ids))
  return heads_first(out)


# The Triton kernel's (forward, backward) blocks by (head_dim, bytes per element), backward
# for dq and dk/dv, queries and keys alike: the largest that compile, forward and backward,
# for A100, H100 (sm_90a) and B200 (`python -m benchmarks.triton_blocks`, compile-only). In
# bfloat16 at head_dim 128, 128-wide backward blocks compile for A100 and H100 but need
# 296,000 bytes of shared memory on a B200 (232,448 there); forward blocks of 256 exceed the
# shared memory at head_dim 128 on all three. Float32 tiles are twice the bytes: at head_dim
# 128 forward blocks of 128 ask an H100 for 262,144 bytes, and at head_dim 64 backward
# blocks of 128 for 263,168. Other shapes keep forward KERNEL_BLOCK and the kernel's default
# backward 32. Which is fastest is not known: only a GPU can time them.
_TRITON_BLOCKS = {(64, 2): (128, 128), (128, 2): (128, 64), (64, 4): (128, 64), (128, 4): (64, 64)}


def triton_block_sizes(q, block):
  """The Triton kernel's blocks for queries like `q`, none larger than `block`."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  forward, backward = _TRITON_BLOCKS.get((q.shape[-1], q.dtype.itemsize), (block, 32))
  forward, backward = min(forward, block), min(backward, block)
  return gpu_attention.BlockSizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                                  block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)


def _triton_kernel(q, k, v, segment_ids, *, block, interpret):
  """The Pallas GPU flash-attention kernel; it wants as many key/value heads as queries."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  return gpu_attention.mha(q, k, v, segment_ids, sm_scale=q.shape[-1]**-0.5, causal=True,
                           block_sizes=triton_block_sizes(q, block), interpret=interpret)


def _cudnn_kernel(q, k, v, segment_ids, *, block, interpret):
  """cuDNN's fused attention; plain causal (resolve_implementation refuses segment ids)."""
  del segment_ids, block, interpret
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
