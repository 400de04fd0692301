"""Continuous batching over one shared KV cache (JetStream's prefill / insert / generate).

One thread owns the devices. The cache has `slots` rows of `max_len` positions. Between
decode steps the waiting requests are prefilled (each prompt right-padded to a power-of-two
bucket, several prompts of a bucket in one call, so few shapes compile) and inserted into
free rows; each decode step advances every row at once in one jitted function, and a row is
free again as soon as its request ends. Each row samples with its own temperature, top_p and
key (the request's seed folded with the token's index), so a seeded request gives the same
tokens alone or among others.
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
# Prompt tokens (padding included) that one prefill call computes: a bucket's prompts are
# prefilled PREFILL_TOKENS // bucket at a time (at least one, at most the slots).
PREFILL_TOKENS = 128


class QueueFull(Exception):
  """The engine's queue holds max_queue requests already."""


@dataclasses.dataclass(frozen=True)
class Token:
  id: int
  logprob: float = 0.0  # log p(id) under the model (temperature 1), if the request asks
  top: tuple[tuple[int, float], ...] = ()  # the TOP_LOGPROBS most likely (id, logprob), too


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
  logprobs: bool = False  # each Token carries its logprob and the most likely alternatives
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

  def sample(scaled):
    # The sort is most of a small model's step on a CPU: skipped when no row asks for top_p.
    scaled = jax.lax.cond(jnp.any(top_p < 1), nucleus, lambda scaled: scaled, scaled)
    keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds,
                                                                                         counts)
    # Inverse transform sampling: the first token whose cumulative probability passes one
    # uniform number per row (a Gumbel draw per vocabulary entry costs 4x as much on a CPU).
    uniform = jax.vmap(jax.random.uniform)(keys)  # [rows] in [0, 1)
    cumulative = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)  # [rows, vocab]
    return jnp.minimum(jnp.sum(cumulative <= uniform[:, None] * cumulative[:, -1:], axis=-1),
                       logits.shape[-1] - 1).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def nothing(logits):
    return jnp.zeros(logits.shape[:1], jnp.int32)

  # Each way is computed only when some row takes it (the argmax over the vocabulary alone
  # was 0.3 ms of a 16-row step of the tiny model on a CPU).
  sampled = jax.lax.cond(jnp.any(temperature > 0), sample, nothing, scaled)
  return jnp.where(temperature > 0, sampled,
                   jax.lax.cond(jnp.all(temperature > 0), nothing, greedy, logits))


def _pick(logits, seeds, counts, temperature, top_p, logprobs):
  """(tokens [rows], their logprobs [rows], top ids and logprobs [rows, TOP_LOGPROBS]); the
  logprobs are computed only when some row asks for them (`logprobs` [rows] bool), else 0."""
  tokens = sample_rows(logits, seeds, counts, temperature, top_p)

  def with_logprobs(logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids, top_logp

  def without(logits):
    return jax.tree.map(lambda like: jnp.zeros(like.shape, like.dtype),
                        jax.eval_shape(with_logprobs, logits))

  return tokens, *jax.lax.cond(jnp.any(logprobs), with_logprobs, without, logits)


def _placed(cache, shardings):
  """The cache laid out as it came in (the same input types next time: no recompilation)."""
  kv, rows = shardings
  constrain = jax.lax.with_sharding_constraint
  return model_lib.KVCache(constrain(cache.k, kv), constrain(cache.v, kv),
                           constrain(cache.segment_ids, rows), constrain(cache.index, rows))


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings'), donate_argnames=('cache',))
def _prefill(params, cache, tokens, lengths, slots, seeds, temperature, top_p, logprobs, *,
             graphdef, shardings):
  """Runs prompts (tokens [prompts, bucket], lengths [prompts] real ones each, then
  padding), writes each one's keys and values into its row `slots` [prompts] of the cache
  and picks its first token. A row may repeat an earlier one (same prompt, same slot)."""
  model = nnx.merge(graphdef, params)
  prompts, padded = tokens.shape
  segment_ids = (jnp.arange(padded)[None] < lengths[:, None]).astype(jnp.int32)
  logits, fresh = model(tokens, None, segment_ids,
                        cache=model_lib.KVCache.zeros(model.config, prompts, padded))
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [prompts, vocab]
  picked = _pick(last, seeds, jnp.zeros_like(seeds), temperature, top_p, logprobs)
  # The rest of each row is free: invisible until decoding writes it.
  row_segments = jnp.zeros((prompts, cache.segment_ids.shape[1]),
                           jnp.int32).at[:, :padded].set(segment_ids)
  k, v, cached_segments = cache.k, cache.v, cache.segment_ids
  for row in range(prompts):
    slot = slots[row]
    k = jax.lax.dynamic_update_slice(k, model_lib.as_bits(fresh.k[:, row:row + 1]),
                                     (0, slot, 0, 0, 0))
    v = jax.lax.dynamic_update_slice(v, model_lib.as_bits(fresh.v[:, row:row + 1]),
                                     (0, slot, 0, 0, 0))
    cached_segments = jax.lax.dynamic_update_slice(cached_segments, row_segments[row:row + 1],
                                                   (slot, 0))
  # Decoding continues after each prompt's last real token.
  cache = model_lib.KVCache(k, v, cached_segments, cache.index.at[slots].set(lengths))
  return picked, _placed(cache, shardings)


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings', 'window'),
                   donate_argnames=('cache',))
def _decode(params, cache, tokens, seeds, counts, temperature, top_p, logprobs, *, graphdef,
            shardings, window):
  """One token for every row: tokens and sampling arguments [slots]; each row attends to its
  own keys, its new ones written at its own index. The model reads only the first `window`
  positions of the cache (a bucket holding every busy row); the new keys and values alone
  are written back, in place."""
  model = nnx.merge(graphdef, params)
  dtype = model.config.compute_dtype
  view = model_lib.KVCache(model_lib.from_bits(cache.k[:, :, :window], dtype),
                           model_lib.from_bits(cache.v[:, :, :window], dtype),
                           cache.segment_ids[:, :window], cache.index)
  logits, view = model(tokens[:, None], cache=view)  # [slots, 1, vocab]; positions: the index
  rows, written = jnp.arange(tokens.shape[0]), cache.index  # where each row's new token went

  def write_back(stack, new):  # a free row's index may lie past the window: garbage, unseen
    new = model_lib.as_bits(new)[:, rows, jnp.minimum(written, window - 1)]
    return stack.at[:, rows, written].set(new, mode='drop')  # [layers, slots, kv_heads, head_dim]

  cache = model_lib.KVCache(
      write_back(cache.k, view.k), write_back(cache.v, view.v),
      jax.lax.dynamic_update_slice(cache.segment_ids, view.segment_ids, (0, 0)), view.index)
  return _pick(logits[:, 0], seeds, counts, temperature, top_p, logprobs), _placed(cache, shardings)


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
    zeros = model_lib.KVCache.zeros(model.config, slots, self.max_len)
    self._cache = jax.device_put(  # keys and values as bits, updated in place (model.as_bits)
        dataclasses.replace(zeros, k=model_lib.as_bits(zeros.k), v=model_lib.as_bits(zeros.v)),
        model_lib.KVCache(*self._shardings[:1] * 2, *self._shardings[1:] * 2))
    self._active: list[Request | None] = [None] * slots
    # Per row: the last token and the sampling arguments, sent to each decode step.
    self._tokens = np.zeros(slots, np.int32)
    self._seeds = np.zeros(slots, np.int32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_p = np.ones(slots, np.float32)
    self._logprobs = np.zeros(slots, bool)
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
      self._prefill_rows([(0, Request([0] * padded, 0, lambda event: None))])
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
        self._insert(admitted)
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

  def _prompts_per_prefill(self, padded: int) -> int:
    """How many prompts of bucket `padded` one prefill call computes (always that many: a
    row's result then never depends on how many requests were waiting with it)."""
    return min(self.slots, max(1, PREFILL_TOKENS // padded))

  def _prefill_rows(self, group: list[tuple[int, Request]]):
    """Prefills (slot, request) pairs of one bucket, at most _prompts_per_prefill of them, in one
    call (the first repeated to fill the rows); returns the picked tokens' arrays."""
    padded = bucket(len(group[0][1].prompt), self.max_len)
    rows = group + group[:1] * (self._prompts_per_prefill(padded) - len(group))
    tokens = np.zeros((len(rows), padded), np.int32)
    for row, (_, request) in enumerate(rows):
      tokens[row, :len(request.prompt)] = request.prompt

    def field(read, dtype):
      return np.array([read(slot, request) for slot, request in rows], dtype)

    picked, self._cache = _prefill(self.params, self._cache, tokens,
                                   field(lambda _, r: len(r.prompt), np.int32),
                                   field(lambda slot, _: slot, np.int32),
                                   field(lambda _, r: r.seed, np.int32),
                                   field(lambda _, r: r.temperature, np.float32),
                                   field(lambda _, r: r.top_p, np.float32),
                                   field(lambda _, r: r.logprobs, bool), graphdef=self.graphdef,
                                   shardings=self._shardings)
    return jax.device_get(picked)

  def _insert(self, admitted: list[tuple[int, Request]]):
    """Prefills the admitted (slot, request) pairs, a bucket's worth of prompts per call, and
    hands each its first token."""
    groups = collections.defaultdict(list)  # bucket -> (slot, request), in order of arrival
    for slot, request in admitted:
      if request.cancelled.is_set():
        _deliver(request, Finished('cancelled'))
      else:
        groups[bucket(len(request.prompt), self.max_len)].append((slot, request))
    not_started = [pair for waiting in groups.values() for pair in waiting]
    try:
      for padded, waiting in groups.items():
        size = self._prompts_per_prefill(padded)
        for start in range(0, len(waiting), size):
          group = waiting[start:start + size]
          picked = self._prefill_rows(group)
          for row, (slot, request) in enumerate(group):
            not_started.remove((slot, request))
            self._active[slot] = request
            self._seeds[slot], self._temperature[slot] = request.seed, request.temperature
            self._top_p[slot], self._logprobs[slot] = request.top_p, request.logprobs
            if self.metrics:
              self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted)
            self._advance(slot, *(value[row] for value in picked))
    except Exception as error:
      for _, request in not_started:  # admitted but never prefilled: answered here or never
        _deliver(request, Finished('error', f'{type(error).__name__}: {error}'))
      raise

  def _step(self, window: int | None = None):
    counts = np.array([r.generated if r else 0 for r in self._active], np.int32)
    if window is None:  # positions to read: the busy rows' tokens so far and the new one
      window = bucket(max(len(r.prompt) + r.generated for r in self._active if r), self.max_len)
    start = time.monotonic()
    picked, self._cache = _decode(self.params, self._cache, self._tokens, self._seeds, counts,
                                  self._temperature, self._top_p, self._logprobs,
                                  graphdef=self.graphdef, shardings=self._shardings, window=window)
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
    if request.logprobs:
      _deliver(
          request,
          Token(int(token), float(logprob), tuple(zip(top_ids.tolist(), top_logprobs.tolist()))))
    else:
      _deliver(request, Token(int(token)))
    if request.generated >= request.max_tokens:
      self._finish(slot, Finished('length'))

  def _finish(self, slot: int, event: Finished):
    request, self._active[slot] = self._active[slot], None
    # A free row asks for nothing, so the step's conds can skip what only it would need.
    self._temperature[slot], self._top_p[slot], self._logprobs[slot] = 0.0, 1.0, False
    _deliver(request, event)


def _deliver(request: Request, event):
  try:
    request.deliver(event)
  except RuntimeError:  # the receiving event loop has closed: nobody is listening any more
    pass
