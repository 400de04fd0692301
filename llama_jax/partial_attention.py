"""Partial attention: one step of context parallelism, the local queries against one
chip's keys and values.

Forward: out [batch, q_len, heads, head_dim] float32 and lse [batch, q_len, heads] float32
(the log-sum-exp of each query's scores, -inf where a query sees no key), so that partial
results over disjoint keys merge exactly. Gradients: (d_q, d_k, d_v) float32 of one step
given the whole row's out and lse (what flash attention's backward pass needs).

`causal` says the step attends its own tokens (queries and keys the same tokens, in order);
otherwise every query may see every key of the step, within its segment.

  reference  materializes the scores.
  blockwise  attention.py's online softmax over key blocks.
  triton     JAX's Pallas GPU kernel (interpret mode on a CPU), forward with its log-sum-exp
             and its own backward pass given the row's out and lse. The kernel reads the
             queries' and the keys' segment ids from one array, so it takes the steps whose
             queries are their keys (causal) and, without segment ids, the others; with
             packed documents the others run blockwise.
"""

import functools
import math

import jax.numpy as jnp

from llama_jax import attention as attention_lib


def _dense_scores(q, k, q_seg, kv_seg, causal):
  """Scaled scores [batch, kv_heads, group, q_len, kv_len] and their mask (same shape)."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum('bqkgh,bskh->bkgqs', q, k, preferred_element_type=jnp.float32)
  mask = attention_lib.causal_mask(q_len, k.shape[1], 0, q_seg, kv_seg)
  if not causal:
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
  return scores * head_dim**-0.5, jnp.broadcast_to(mask[:, None, None], scores.shape)


def _dense_forward(q, k, v, q_seg, kv_seg, causal):
  scores, mask = _dense_scores(q, k, q_seg, kv_seg, causal)
  row_max = jnp.max(jnp.where(mask, scores, attention_lib._MASKED), axis=-1, keepdims=True)
  probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
  row_sum = probs.sum(-1)  # [batch, kv_heads, group, q_len]
  out = jnp.einsum('bkgqs,bskh->bqkgh', probs / jnp.maximum(row_sum, 1e-30)[..., None],
                   v.astype(jnp.float32))
  lse = jnp.where(row_sum > 0, row_max[..., 0] + jnp.log(row_sum), -jnp.inf)
  batch, q_len, heads, head_dim = q.shape
  return out.reshape(q.shape).astype(jnp.float32), _heads_last(lse).reshape(batch, q_len, heads)


def _heads_last(x):  # [batch, kv_heads, group, q_len] -> [batch, q_len, kv_heads, group]
  return x.transpose(0, 3, 1, 2)


def _dense_grads(q, k, v, q_seg, kv_seg, causal, out, lse, d_out):
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  grouped = lambda x: x.reshape(batch, q_len, kv_heads, heads // kv_heads, *x.shape[3:])
  scores, mask = _dense_scores(q, k, q_seg, kv_seg, causal)
  lse = grouped(lse).transpose(0, 2, 3, 1)  # [batch, kv_heads, group, q_len]
  probs = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)
  d_out = grouped(d_out.astype(jnp.float32))
  delta = jnp.einsum('bqkgh,bqkgh->bkgq', d_out, grouped(out))
  d_v = jnp.einsum('bkgqs,bqkgh->bskh', probs, d_out)
  d_probs = jnp.einsum('bqkgh,bskh->bkgqs', d_out, v.astype(jnp.float32))
  d_scores = probs * (d_probs - delta[..., None]) * head_dim**-0.5
  d_q = jnp.einsum('bkgqs,bskh->bqkgh', d_scores, k.astype(jnp.float32)).reshape(q.shape)
  d_k = jnp.einsum('bkgqs,bqkgh->bskh', d_scores, grouped(q.astype(jnp.float32)))
  return d_q, d_k, d_v


def _to_blocks(x, block, pad_value=0):
  """[batch, length, ...] -> [batch, blocks, block, ...], padded at the end."""
  pad = -x.shape[1] % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def _blockwise_inputs(q, k, v, q_seg, kv_seg, block):
  batch, _, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = _to_blocks(q, block).reshape(batch, -1, block, kv_heads, heads // kv_heads, head_dim)
  # Padded keys get segment -1 and padded queries -2: they never match anything real.
  return (q, _to_blocks(k, block), _to_blocks(v,
                                              block), _to_blocks(q_seg, block,
                                                                 -2), _to_blocks(kv_seg, block, -1))


def _blockwise_forward(q, k, v, q_seg, kv_seg, causal, block):
  batch, q_len, heads, head_dim = q.shape
  out, residuals = attention_lib._flash_forward(*_blockwise_inputs(q, k, v, q_seg, kv_seg, block),
                                                causal)
  lse = jnp.moveaxis(residuals[-1], -1, 2).reshape(batch, -1, heads)[:, :q_len]
  out = out.reshape(batch, -1, heads, head_dim)[:, :q_len]
  return out.astype(jnp.float32), jnp.where(jnp.isinf(lse), -jnp.inf, lse)


def _blockwise_grads(q, k, v, q_seg, kv_seg, causal, out, lse, d_out, block):
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  inputs = _blockwise_inputs(q, k, v, q_seg, kv_seg, block)
  grouped = lambda x: _to_blocks(x, block).reshape(batch, -1, block, kv_heads, heads // kv_heads, *x
                                                   .shape[3:])
  # lse [batch, blocks, kv_heads, group, block]; +inf (a query seeing nothing) -> no probabilities
  lse = jnp.moveaxis(grouped(jnp.where(jnp.isfinite(lse), lse, jnp.inf)), 2, -1)
  d_q, d_k, d_v = attention_lib._flash_grads((*inputs, grouped(out), lse), grouped(d_out), causal)
  unblock = lambda x, like: x.reshape(batch, -1, *like.shape[2:])[:, :like.shape[1]]
  return unblock(d_q, q), unblock(d_k, k), unblock(d_v, v)


def _triton_forward(q, k, v, q_seg, kv_seg, causal, *, block, interpret):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  del kv_seg  # the kernel reads one array: q_seg, the keys' own ids when causal
  k, v = _repeat_heads(k, v, q.shape[2])
  sizes = attention_lib.triton_block_sizes(q, block)
  out, lse = gpu_attention.mha(q, k, v, q_seg if causal else None, sm_scale=q.shape[-1]**-0.5,
                               causal=causal, block_sizes=sizes, interpret=interpret,
                               return_residuals=True)
  return out.astype(jnp.float32), jnp.moveaxis(lse, 1, 2) * math.log(2)  # base 2 -> natural


def _triton_grads(q, k, v, q_seg, kv_seg, causal, out, lse, d_out, *, block, interpret):
  if q.shape[1] != k.shape[1]:  # its backward pass wants as many query blocks as key blocks
    return _square_grads(functools.partial(_triton_grads, block=block, interpret=interpret), q, k,
                         v, q_seg, kv_seg, causal, out, lse, d_out)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  kv_heads = k.shape[2]
  k, v = _repeat_heads(k, v, q.shape[2])
  lse = jnp.moveaxis(lse, 2, 1) / math.log(2)  # [batch, heads, q_len], base 2 as the kernel's
  residuals = (q, k, v, q_seg if causal else None, out.astype(q.dtype), lse)
  d_q, d_k, d_v, _ = gpu_attention._mha_backward(  # the kernel's own vjp, given the row's out, lse
      q.shape[-1]**-0.5, causal, attention_lib.triton_block_sizes(q, block), 'triton', None, 2,
      None, interpret, False, False, residuals, d_out.astype(q.dtype))
  group_sum = lambda x: x.reshape(*x.shape[:2], kv_heads, -1, x.shape[-1]).sum(3)
  return (d_q.astype(jnp.float32), group_sum(d_k.astype(jnp.float32)),
          group_sum(d_v.astype(jnp.float32)))


def _repeat_heads(k, v, heads):
  """The kernel wants as many key/value heads as query heads."""
  group = heads // k.shape[2]
  return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


def _square_grads(grads, q, k, v, q_seg, kv_seg, causal, out, lse, d_out):
  """`grads` of a step whose queries are m times its keys (or the keys m times the
  queries), as m square steps side by side in the batch: every query sees every key."""
  fold = lambda x, m: jnp.concatenate(jnp.split(x, m, axis=1), axis=0)  # [m * batch, L, ...]
  unfold = lambda x, m: jnp.concatenate(jnp.split(x, m, axis=0), axis=1)
  tile = lambda x, m: jnp.concatenate([x] * m, axis=0)
  total = lambda x, m: sum(jnp.split(x, m, axis=0))
  if q.shape[1] > k.shape[1]:
    m = q.shape[1] // k.shape[1]
    d_q, d_k, d_v = grads(fold(q, m), tile(k, m), tile(v, m), fold(q_seg, m), tile(kv_seg, m),
                          causal, *(fold(x, m) for x in (out, lse, d_out)))
    return unfold(d_q, m), total(d_k, m), total(d_v, m)
  m = k.shape[1] // q.shape[1]
  d_q, d_k, d_v = grads(tile(q, m), *(fold(x, m) for x in (k, v)), tile(q_seg, m), fold(kv_seg, m),
                        causal, *(tile(x, m) for x in (out, lse, d_out)))
  return total(d_q, m), unfold(d_k, m), unfold(d_v, m)


def step_functions(implementation, *, block, segments, interpret):
  """(forward, grads) of one step for an implementation of attention.py; `segments` says
  whether the rows are packed documents."""
  if implementation == 'reference':
    return _dense_forward, _dense_grads
  blockwise = (functools.partial(_blockwise_forward,
                                 block=block), functools.partial(_blockwise_grads, block=block))
  if implementation == 'blockwise':
    return blockwise
  triton = (functools.partial(_triton_forward, block=block, interpret=interpret),
            functools.partial(_triton_grads, block=block, interpret=interpret))
  if not segments:
    return triton

  def forward(q, k, v, q_seg, kv_seg, causal):
    return (triton if causal else blockwise)[0](q, k, v, q_seg, kv_seg, causal)

  def grads(q, k, v, q_seg, kv_seg, causal, out, lse, d_out):
    return (triton if causal else blockwise)[1](q, k, v, q_seg, kv_seg, causal, out, lse, d_out)

  return forward, grads
