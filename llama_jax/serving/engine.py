"""Continuous batching over one shared KV cache (JetStream's prefill / insert / generate).

One thread owns the devices. The cache has `slots` rows of `max_len` positions. Between
decode steps a waiting request is prefilled (its prompt right-padded to a power-of-two
bucket, so few shapes compile) and inserted into a free row; each decode step advances
every row at once in one jitted function, and a row is free again as soon as its request
ends. Each row samples with its own temperature, top_p and key (the request's seed folded
with the token's index), so a seeded request gives the same tokens alone or among others.
"""

import collections
import dataclasses
import functools
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import model as model_lib

TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's largest `logprobs`)
_SMALLEST_BUCKET = 16


class QueueFull(Exception):
  """The engine's queue holds max_queue requests already."""


@dataclasses.dataclass(frozen=True)
class Token:
  id: int
  logprob: float  # log p(id) under the model (temperature 1)
  top: tuple[tuple[int, float], ...]  # the TOP_LOGPROBS most likely (id, logprob)


@dataclasses.dataclass(frozen=True)
class Finished:
  reason: str  # 'stop' (a stop id), 'length' (max_tokens), 'cancelled' or 'error'
  message: str = ''


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt to continue; `deliver` gets each Token, then one Finished (engine thread)."""
  prompt: list[int]
  max_tokens: int
  deliver: Callable[[Token | Finished], None]
  temperature: float = 0.0  # 0 is greedy
  top_p: float = 1.0
  seed: int = 0
  stop_ids: frozenset[int] = frozenset()
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  generated: int = 0


def bucket(length: int, max_len: int) -> int:
  """The prefill length for a prompt: the next power of two (at least 16, at most max_len)."""
  return min(max(_SMALLEST_BUCKET, 1 << (length - 1).bit_length()), max_len)


def sample_rows(logits, seeds, counts, temperature, top_p):
  """Next token per row [rows] from float32 logits [rows, vocab], each row with its own
  temperature (0: greedy), top_p and key: key(seed) folded with the token's index `count`."""
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

  def nucleus(scaled):  # the smallest set of tokens whose probability reaches top_p (>= 1)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True),
                               logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)

  # The sort is most of a small model's step on a CPU: skipped when no row asks for top_p.
  scaled = jax.lax.cond(jnp.any(top_p < 1), nucleus, lambda scaled: scaled, scaled)
  keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds,
                                                                                       counts)
  # Inverse transform sampling: the first token whose cumulative probability passes one uniform
  # number per row (a Gumbel draw per vocabulary entry costs 4x as much on a CPU).
  uniform = jax.vmap(jax.random.uniform)(keys)  # [rows] in [0, 1)
  cumulative = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)  # [rows, vocab]
  sampled = jnp.minimum(jnp.sum(cumulative <= uniform[:, None] * cumulative[:, -1:], axis=-1),
                        logits.shape[-1] - 1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _pick(logits, seeds, counts, temperature, top_p):
  """(tokens [rows], their logprobs [rows], top ids and logprobs [rows, TOP_LOGPROBS])."""
  tokens = sample_rows(logits, seeds, counts, temperature, top_p)
  logp = jax.nn.log_softmax(logits, axis=-1)
  top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids, top_logp


def _placed(cache, shardings):
  """The cache laid out as it came in (the same input types next time: no recompilation)."""
  kv, rows = shardings
  constrain = jax.lax.with_sharding_constraint
  return model_lib.KVCache(constrain(cache.k, kv), constrain(cache.v, kv),
                           constrain(cache.segment_ids, rows), constrain(cache.index, rows))


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings'), donate_argnames=('cache',))
def _prefill(params, cache, tokens, length, slot, seed, temperature, top_p, *, graphdef, shardings):
  """Runs one prompt (tokens [1, bucket], `length` real ones, then padding), writes its keys
  and values into row `slot` of the cache and picks its first token."""
  model = nnx.merge(graphdef, params)
  padded = tokens.shape[1]
  segment_ids = (jnp.arange(padded) < length).astype(jnp.int32)[None]  # [1, bucket]
  logits, fresh = model(tokens, None, segment_ids,
                        cache=model_lib.KVCache.zeros(model.config, 1, padded))
  last = jax.lax.dynamic_slice_in_dim(logits[0], length - 1, 1)  # [1, vocab]
  picked = _pick(last, seed[None], jnp.zeros((1,), jnp.int32), temperature[None], top_p[None])
  row_segments = jnp.zeros((1, cache.segment_ids.shape[1]), jnp.int32).at[:, :padded].set(
      segment_ids)  # the rest of the row is free: invisible until decoding writes it
  cache = model_lib.KVCache(
      jax.lax.dynamic_update_slice(cache.k, fresh.k, (0, slot, 0, 0, 0)),
      jax.lax.dynamic_update_slice(cache.v, fresh.v, (0, slot, 0, 0, 0)),
      jax.lax.dynamic_update_slice(cache.segment_ids, row_segments, (slot, 0)),
      cache.index.at[slot].set(length))  # decoding continues after the last real token
  return picked, _placed(cache, shardings)


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings', 'window'),
                   donate_argnames=('cache',))
def _decode(params, cache, tokens, seeds, counts, temperature, top_p, *, graphdef, shardings,
            window):
  """One token for every row: tokens and sampling arguments [slots]; each row attends to its
  own keys, its new ones written at its own index. Only the first `window` positions of the
  cache (a bucket holding every busy row) are read and written, in place."""
  model = nnx.merge(graphdef, params)
  view = model_lib.KVCache(cache.k[:, :, :window], cache.v[:, :, :window],
                           cache.segment_ids[:, :window], cache.index)
  logits, view = model(tokens[:, None], cache=view)  # [slots, 1, vocab]; positions: the index
  cache = model_lib.KVCache(
      jax.lax.dynamic_update_slice(cache.k, view.k, (0,) * 5),
      jax.lax.dynamic_update_slice(cache.v, view.v, (0,) * 5),
      jax.lax.dynamic_update_slice(cache.segment_ids, view.segment_ids, (0, 0)), view.index)
  return _pick(logits[:, 0], seeds, counts, temperature, top_p), _placed(cache, shardings)


class Engine:
  """Owns the model and the cache; `submit` queues a Request, a thread serves them."""
  def __init__(self, model, slots: int, max_queue: int, metrics=None):
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.config = model.config
    self.slots, self.max_len, self.max_queue = slots, model.config.max_seq_len, max_queue
    self.metrics = metrics
    # Keys and values split over the mesh's `tensor` axis by kv head (as the projections
    # are), the rest replicated.
    mesh = jax.tree.leaves(self.params)[0].sharding.mesh
    tensor = dict(mesh.shape).get('tensor', 1)
    heads = 'tensor' if tensor > 1 and model.config.kv_heads % tensor == 0 else None
    self._shardings = (NamedSharding(mesh, P(None, None, None, heads)), NamedSharding(mesh, P()))
    self._cache = jax.device_put(
        model_lib.KVCache.zeros(model.config, slots, self.max_len),
        model_lib.KVCache(*self._shardings[:1] * 2, *self._shardings[1:] * 2))
    self._active: list[Request | None] = [None] * slots
    # Per row: the last token and the sampling arguments, sent to each decode step.
    self._tokens = np.zeros(slots, np.int32)
    self._seeds = np.zeros(slots, np.int32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_p = np.ones(slots, np.float32)
    self._pending = collections.deque()
    self._wakeup = threading.Condition()
    self._stopping = False
    self._thread = threading.Thread(target=self._run, name='engine', daemon=True)

  @property
  def queue_length(self) -> int:
    return len(self._pending)

  @property
  def slots_busy(self) -> int:
    return sum(request is not None for request in self._active)

  def start(self):
    self._thread.start()

  def stop(self):
    """Ends the thread; requests still queued or running finish as 'cancelled'."""
    with self._wakeup:
      self._stopping = True
      self._wakeup.notify()
    self._thread.join()

  def submit(self, request: Request):
    """Queues `request` (raises QueueFull when max_queue requests are waiting)."""
    if len(request.prompt) + request.max_tokens > self.max_len or not request.prompt:
      raise ValueError(f'the prompt ({len(request.prompt)} tokens) plus max_tokens '
                       f'({request.max_tokens}) must fit the model ({self.max_len} tokens).')
    with self._wakeup:
      if len(self._pending) >= self.max_queue:
        raise QueueFull()
      self._pending.append(request)
      self._wakeup.notify()

  def warm_up(self):
    """Compiles every prefill and decode bucket before the first request."""
    length = _SMALLEST_BUCKET
    while True:
      padded = bucket(length, self.max_len)
      self._prefill_into(0, Request([0] * padded, 0, lambda event: None))
      self._step(window=padded)
      if padded == self.max_len:
        break
      length = padded * 2

  def _run(self):
    while True:
      with self._wakeup:
        while not (self._stopping or self._pending or self.slots_busy):
          self._wakeup.wait()
        if self._stopping:
          break
        admitted = []
        for slot, request in enumerate(self._active):
          if request is None and self._pending:
            admitted.append((slot, self._pending.popleft()))
      try:
        for slot, request in admitted:
          self._insert(slot, request)
        if self.slots_busy:
          self._step()
      except Exception as error:  # noqa: BLE001  (the server keeps serving the next requests)
        logging.exception('engine step failed')
        for slot, request in enumerate(self._active):
          if request is not None:
            self._finish(slot, Finished('error', f'{type(error).__name__}: {error}'))
    for slot, request in enumerate(self._active):
      if request is not None:
        self._finish(slot, Finished('cancelled'))
    while self._pending:
      _deliver(self._pending.popleft(), Finished('cancelled'))

  def _prefill_into(self, slot: int, request: Request):
    padded = bucket(len(request.prompt), self.max_len)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :len(request.prompt)] = request.prompt
    picked, self._cache = _prefill(self.params, self._cache, tokens, np.int32(len(request.prompt)),
                                   np.int32(slot), np.int32(request.seed),
                                   np.float32(request.temperature), np.float32(request.top_p),
                                   graphdef=self.graphdef, shardings=self._shardings)
    return jax.device_get(picked)

  def _insert(self, slot: int, request: Request):
    if request.cancelled.is_set():
      _deliver(request, Finished('cancelled'))
      return
    picked = self._prefill_into(slot, request)
    self._active[slot] = request
    self._seeds[slot], self._temperature[slot] = request.seed, request.temperature
    self._top_p[slot] = request.top_p
    if self.metrics:
      self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted)
    self._advance(slot, *(value[0] for value in picked))

  def _step(self, window: int | None = None):
    counts = np.array([r.generated if r else 0 for r in self._active], np.int32)
    if window is None:  # positions to read: the busy rows' tokens so far and the new one
      window = bucket(max(len(r.prompt) + r.generated for r in self._active if r), self.max_len)
    start = time.monotonic()
    picked, self._cache = _decode(self.params, self._cache, self._tokens, self._seeds, counts,
                                  self._temperature, self._top_p, graphdef=self.graphdef,
                                  shardings=self._shardings, window=window)
    picked = jax.device_get(picked)
    busy = 0
    for slot, request in enumerate(self._active):
      if request is not None:
        busy += 1
        self._advance(slot, *(value[slot] for value in picked))
    if self.metrics:
      self.metrics.tokens_per_second.set(busy / (time.monotonic() - start))

  def _advance(self, slot: int, token, logprob, top_ids, top_logprobs):
    """Hands the row's new token to its request, or ends the request."""
    request = self._active[slot]
    if request.cancelled.is_set():
      return self._finish(slot, Finished('cancelled'))
    if int(token) in request.stop_ids:
      return self._finish(slot, Finished('stop'))
    request.generated += 1
    self._tokens[slot] = token
    if self.metrics:
      self.metrics.generated_tokens.inc()
    _deliver(request,
             Token(int(token), float(logprob), tuple(zip(top_ids.tolist(), top_logprobs.tolist()))))
    if request.generated >= request.max_tokens:
      self._finish(slot, Finished('length'))

  def _finish(self, slot: int, event: Finished):
    request, self._active[slot] = self._active[slot], None
    _deliver(request, event)


def _deliver(request: Request, event):
  try:
    request.deliver(event)
  except RuntimeError:  # the receiving event loop has closed: nobody is listening any more
    pass
