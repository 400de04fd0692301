"""The LLaMA transformer (Touvron et al. 2023) in Flax NNX.

A pre-norm decoder: token embedding, then `n_layers` identical blocks

    x = x + attention(rms_norm(x))      # rotary positions, grouped-query heads
    x = x + swiglu(rms_norm(x))         # w2(silu(w1 x) * w3 x)

then a final RMSNorm and the output projection to the vocabulary: its own matrix, or the
embedding table itself (`tie_embeddings`, Llama 3.2 1B/3B). No biases. Rotary
frequencies may be scaled for long contexts (`rope_scaling`, Llama 3.1; see rope.py).
With `lora.rank` > 0 each targeted projection adds a low-rank update (lora.py).

Parameters are float32 and name their logical axes (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `layers`); `sharding.py` maps those names onto a device mesh.
Activations run in the compute dtype; norm statistics, softmax and logits in float32.
The blocks' parameters are stacked along a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax import attention as attention_lib
from llama_jax import lora as lora_lib
from llama_jax import rope
from llama_jax.errors import ConfigError
from llama_jax.projection import project
from llama_jax.sharding import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Rematerialization policies: what the backward pass keeps instead of recomputing.
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    'none': None,  # no jax.checkpoint: keep every activation
    'full': _policies.nothing_saveable,  # keep only each block's input
    # keep the projections' and attention's outputs; recompute norms, rotary, gates, softmax
    'save_dots':
        _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                          _policies.save_only_these_names('attention_out')),
    # keep q, k, v and the attention output
    'save_attention': _policies.save_only_these_names('query', 'key', 'value', 'attention_out'),
    # the same four, kept in host memory (pinned_host) and brought back for the backward pass
    'offload': _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=['query', 'key', 'value', 'attention_out'],
        offload_src='device', offload_dst='pinned_host'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters, named as in Meta's reference `ModelArgs`."""
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None  # None: as many as n_heads (LLaMA 1)
  vocab_size: int = 32000
  multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: rope.LinearScaling | rope.Llama3Scaling | None = None  # see rope.py
  tie_embeddings: bool = False  # the output projection is the embedding table
  max_seq_len: int = 2048
  dtype: str = 'bfloat16'  # compute dtype, and a LoRA run's frozen base; parameters float32
  attention: str = 'auto'  # see attention.py
  context_parallel: str = 'all_gather'  # how keys/values cross a `sequence` axis: or ring
  remat: str = 'full'  # a key of REMAT_POLICIES
  scan_layers: bool = True  # False: a Python loop over layers, for debugging
  lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig()  # low-rank adapters on frozen projections

  def __post_init__(self):
    # A dict (from a config file or a saved checkpoint) becomes its frozen dataclass.
    object.__setattr__(self, 'rope_scaling', rope.scaling_from_dict(self.rope_scaling))

    def check(ok, message):
      if not ok:
        raise ConfigError(message)

    for key in ('dim', 'n_layers', 'n_heads', 'vocab_size', 'multiple_of', 'max_seq_len'):
      check(getattr(self, key) > 0, f'model.{key} must be positive, got {getattr(self, key)}.')
    check(self.dim % self.n_heads == 0,
          f'model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}).')
    check(self.head_dim % 2 == 0,
          f'model.dim / model.n_heads ({self.head_dim}) must be even for rotary embeddings.')
    check(
        self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
        f'model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads '
        f'({self.n_kv_heads}).')
    check(self.dtype in DTYPES, f'model.dtype is {self.dtype!r}; use one of {", ".join(DTYPES)}.')
    check(
        self.attention in attention_lib.IMPLEMENTATIONS,
        f'model.attention is {self.attention!r}; use one of '
        f'{", ".join(attention_lib.IMPLEMENTATIONS)}.')
    check(self.context_parallel in ('all_gather', 'ring'),
          f'model.context_parallel is {self.context_parallel!r}; use all_gather or ring.')
    check(self.remat in REMAT_POLICIES,
          f'model.remat is {self.remat!r}; use one of {", ".join(REMAT_POLICIES)}.')

  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    """Builds the dataclass from the `model` group of an ml_collections config."""
    values = dict(model_config)
    values['lora'] = lora_lib.LoRAConfig(**dict(values.get('lora', {})))
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f'unknown model config keys: {", ".join(sorted(unknown))}.')
    return cls(**values)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def hidden_dim(self) -> int:
    """SwiGLU width: 2/3 of 4*dim, scaled, rounded up to `multiple_of` (Meta's formula)."""
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * -(-hidden // self.multiple_of)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def _param(rngs, shape, axes, init=nnx.initializers.normal(0.02)):
  """A float32 parameter annotated with its logical axis names."""
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for decoding, each row written at its `index` onwards."""
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: jax.Array  # [batch, max_len]; 0 marks padding
  index: jax.Array  # [batch] int32: number of positions written in each row

  @classmethod
  def zeros(cls, config: ModelConfig, batch: int, max_len: int) -> 'KVCache':
    shape = (config.n_layers, batch, max_len, config.kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype),
               jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))


class LayerCache(NamedTuple):
  """The KVCache as one layer sees it while decoding: new tokens go at `index` of `layer`.

  Every layer's keys and values travel together through the layer scan (as its carry) and
  each layer updates only its own slice, in place: as scan outputs they would be copied whole
  at every decode step. They travel as bits (`as_bits`).
  """
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: jax.Array  # [batch, max_len], already holding the new tokens' ids
  index: jax.Array  # [batch]
  layer: jax.Array  # [] int32


def as_bits(x):
  """16-bit floats as the uint16 of their bits (other dtypes as they are). XLA:CPU slices and
  updates a bfloat16 array by converting all of it to float32 and back; integers it updates
  in place."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype in (jnp.bfloat16,
                                                                    jnp.float16) else x


def from_bits(x, dtype):
  """The inverse of as_bits for an array of `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def write_tokens(stack, layer, new, index):
  """stack [layers, batch, max_len, ...] (bits) with new [batch, length, ...] written into
  `layer` from each row's index (positions past max_len dropped): a scatter of the new
  tokens alone, in place."""
  batch, length = new.shape[:2]
  positions = index[:, None] + jnp.arange(length)  # [batch, length]
  return stack.at[layer, jnp.arange(batch)[:, None], positions].set(as_bits(new), mode='drop')


def write_rows(buffer, new, index):
  """buffer [batch, max_len, ...] with new [batch, length, ...] written from each row's index.

  index: [batch]. A select over the row (the cache's int32 segment ids; its keys and values
  are written by write_tokens).
  """
  length = new.shape[1]
  offset = jnp.arange(buffer.shape[1])[None] - index[:, None]  # [batch, max_len]
  expand = (slice(None), slice(None)) + (None,) * (buffer.ndim - 2)
  if length > 1:  # each position takes its own new token (one token simply broadcasts)
    new = jnp.take_along_axis(new, jnp.clip(offset, 0, length - 1)[expand], axis=1)
  return jnp.where(((offset >= 0) & (offset < length))[expand], new, buffer)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, with the statistics in float32."""
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = config.norm_eps
    self.scale = _param(rngs, (config.dim,), ('embed',), nnx.initializers.ones)

  def __call__(self, x):  # x: [batch, length, embed]
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...]).astype(x.dtype)


def apply_rotary(x, positions, theta, scaling=None):
  """Rotates each (i, i + head_dim/2) feature pair by position * theta^(-2i/head_dim).

  x: [batch, length, heads, head_dim]; positions: [batch, length]; `scaling` adjusts the
  frequencies (rope.py). This is the "rotate half" layout of Hugging Face; Meta's
  interleaved pairs differ by a permutation of the query and key projections (convert.py).
  """
  inverse_freq = rope.inverse_frequencies(x.shape[-1], theta, scaling)  # [head_dim / 2]
  angles = positions[..., None].astype(jnp.float32) * inverse_freq  # [batch, length, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped key/value heads and rotary positions."""
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.kv_heads, config.head_dim
    self.wq = _param(rngs, (dim, heads, head_dim), ('embed', 'heads', 'head_dim'))
    self.wk = _param(rngs, (dim, kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'))
    self.wv = _param(rngs, (dim, kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'))
    self.wo = _param(rngs, (heads, head_dim, dim), ('heads', 'head_dim', 'embed'))
    lora_lib.add_adapters(self, ('wq', 'wk', 'wv', 'wo'), config.lora, {'wo': 2}, rngs)

  def __call__(self, x, positions, segment_ids, cache: LayerCache | None = None):
    """x: [batch, length, embed] -> [batch, length, embed] (and the updated cache)."""
    config, dtype = self.config, self.config.compute_dtype
    scale = config.lora.scale
    q = project(x, self.wq[...].astype(dtype)) + lora_lib.delta(self, 'wq', x, scale)
    k = project(x, self.wk[...].astype(dtype)) + lora_lib.delta(self, 'wk', x, scale)
    v = project(x, self.wv[...].astype(dtype)) + lora_lib.delta(self, 'wv', x, scale)
    # q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]
    q = checkpoint_name(apply_rotary(q, positions, config.rope_theta, config.rope_scaling), 'query')
    k = checkpoint_name(apply_rotary(k, positions, config.rope_theta, config.rope_scaling), 'key')
    v = checkpoint_name(v, 'value')
    # Split along the sequence; attention brings each chip the keys and values it needs.
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    k = constrain(k, ('batch', 'length', 'act_heads', None))
    v = constrain(v, ('batch', 'length', 'act_heads', None))
    if cache is None:
      out = attention_lib.attention(q, k, v, segment_ids, segment_ids,
                                    implementation=config.attention,
                                    context_parallel=config.context_parallel)
    else:  # decoding: append to this layer's cache, attend to everything written so far
      layer = cache.layer
      cache = cache._replace(k=write_tokens(cache.k, layer, k, cache.index),
                             v=write_tokens(cache.v, layer, v, cache.index))
      out = attention_lib.reference_attention(q, from_bits(cache.k[layer], k.dtype),
                                              from_bits(cache.v[layer], v.dtype), segment_ids,
                                              cache.segment_ids, cache.index)
    out = checkpoint_name(constrain(out, ('batch', 'length', 'act_heads', None)), 'attention_out')
    out = project(out, self.wo[...].astype(dtype), contract=2) + lora_lib.delta(
        self, 'wo', out, scale)
    return out, cache  # [batch, length, embed]


class FeedForward(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = config.compute_dtype
    self.scale = config.lora.scale
    self.w1 = _param(rngs, (config.dim, config.hidden_dim), ('embed', 'mlp'))
    self.w3 = _param(rngs, (config.dim, config.hidden_dim), ('embed', 'mlp'))
    self.w2 = _param(rngs, (config.hidden_dim, config.dim), ('mlp', 'embed'))
    lora_lib.add_adapters(self, ('w1', 'w2', 'w3'), config.lora, {}, rngs)

  def __call__(self, x):  # x: [batch, length, embed]
    gate = project(x, self.w1[...].astype(self.dtype)) + lora_lib.delta(self, 'w1', x, self.scale)
    up = project(x, self.w3[...].astype(self.dtype)) + lora_lib.delta(self, 'w3', x, self.scale)
    hidden = constrain(jax.nn.silu(gate) * up, ('batch', 'length', 'act_mlp'))  # [.., mlp]
    return project(hidden, self.w2[...].astype(self.dtype)) + lora_lib.delta(
        self, 'w2', hidden, self.scale)  # [batch, length, embed]


class Block(nnx.Module):
  """One pre-norm transformer layer."""
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(config, rngs=rngs)
    self.attention = Attention(config, rngs=rngs)
    self.ffn_norm = RMSNorm(config, rngs=rngs)
    self.feed_forward = FeedForward(config, rngs=rngs)

  def __call__(self, x, positions, segment_ids, cache: LayerCache | None = None):
    h, cache = self.attention(self.attention_norm(x), positions, segment_ids, cache)
    x = x + h
    x = x + self.feed_forward(self.ffn_norm(x))
    return constrain(x, ('batch', 'length', 'act_embed')), cache


class Transformer(nnx.Module):
  """LLaMA: tokens [batch, length] -> logits [batch, length, vocab] (float32)."""
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedding = _param(rngs, (config.vocab_size, config.dim), ('vocab', 'embed'))

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def stacked_blocks(rngs):
      return Block(config, rngs=rngs)

    self.layers = stacked_blocks(rngs)  # every parameter gets a leading [layers] axis
    self.norm = RMSNorm(config, rngs=rngs)
    if not config.tie_embeddings:
      self.output = _param(rngs, (config.dim, config.vocab_size), ('embed', 'vocab'))

  def output_weights(self):
    """The output projection [embed, vocab] float32: logits = features @ output_weights."""
    return self.embedding[...].T if self.config.tie_embeddings else self.output[...]

  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
    """Returns (logits [batch, length, vocab] float32, cache); arguments as in `features`."""
    x, cache = self.features(tokens, positions, segment_ids, cache)
    w = self.output_weights().astype(self.config.compute_dtype)
    logits = project(x, w, out_dtype=jnp.float32)
    return constrain(logits, ('batch', 'length', 'act_vocab')), cache

  def features(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
    """Returns (final normed features [batch, length, embed], cache).

    tokens, positions, segment_ids: [batch, length] int. Positions default to
    0..length-1 (after the cache's index when decoding). Segment ids, if given, keep
    attention inside each packed document; 0 marks padding when decoding. With a
    cache, keys and values are appended at `cache.index` and the new cache returned.
    """
    config = self.config
    batch, length = tokens.shape
    start = 0 if cache is None else cache.index[:, None]  # [batch, 1] when decoding
    if cache is None and length > config.max_seq_len:
      raise ConfigError(f'sequence length {length} exceeds model.max_seq_len '
                        f'({config.max_seq_len}); raise model.max_seq_len or shorten the input.')
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    # The table is gathered over its embed shards first (as FSDP does for every weight);
    # left to itself XLA would gather the [batch, length, embed] activations of the whole
    # global batch instead.
    table = constrain(self.embedding[...].astype(config.compute_dtype), ('vocab', 'act_embed'))
    x = table[tokens]  # [batch, length, embed]
    x = constrain(x, ('batch', 'length', 'act_embed'))

    if cache is not None:
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
      cache = dataclasses.replace(
          cache, segment_ids=write_rows(cache.segment_ids, segment_ids, cache.index))

    x, new_kv = self._run_layers(x, positions, segment_ids, cache)
    if cache is not None:
      cache = KVCache(*new_kv, cache.segment_ids, cache.index + length)
    return self.norm(x), cache

  def _run_layers(self, x, positions, segment_ids, cache: KVCache | None):
    """Applies the stacked blocks with lax.scan (or a loop), under the remat policy.

    Returns x and, when decoding, every layer's (k, v) with the new tokens written.
    """
    graphdef, layer_params = nnx.split(self.layers)
    layers = jnp.arange(self.config.n_layers)

    def apply_block(carry, params_and_layer):
      x, kv = carry  # kv: every layer's (k, v), carried from layer to layer
      params, layer = params_and_layer
      block = nnx.merge(graphdef, params)
      layer_cache = None if kv is None else LayerCache(*kv, cache.segment_ids, cache.index, layer)
      x, layer_cache = block(x, positions, segment_ids, layer_cache)
      return (x, None if layer_cache is None else (layer_cache.k, layer_cache.v)), None

    policy = REMAT_POLICIES[self.config.remat]
    if self.config.remat != 'none':
      apply_block = jax.checkpoint(apply_block, policy=policy,
                                   prevent_cse=not self.config.scan_layers)
    carry = (x, None if cache is None else (as_bits(cache.k), as_bits(cache.v)))
    if self.config.scan_layers:
      x, kv = jax.lax.scan(apply_block, carry, (layer_params, layers))[0]
    else:
      for i in range(self.config.n_layers):
        carry, _ = apply_block(carry, jax.tree.map(lambda a: a[i], (layer_params, layers)))
      x, kv = carry
    return x, None if kv is None else (from_bits(kv[0], cache.k.dtype),
                                       from_bits(kv[1], cache.v.dtype))


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with shapes only (no memory): for parameter counts and shardings."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def count_params(model: Transformer) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
