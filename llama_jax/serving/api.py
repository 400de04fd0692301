"""The OpenAI-compatible HTTP layer (Starlette): requests in, engine Requests out.

POST /v1/completions and /v1/chat/completions (conversations through the tokenizer's chat
template, as `transformers`' apply_chat_template renders them), both streamed as server-sent
events when asked; GET /v1/models, /health and /metrics. Every request error is an
OpenAI-style body {"error": {"message", "type", "param", "code"}} with its status, and the
server goes on serving.
"""

import asyncio
import functools
import hmac
import json
import random
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llama_jax.data import chat
from llama_jax.errors import UserError
from llama_jax.serving import engine as engine_lib
from llama_jax.serving.text import TextStream

RETRY_AFTER_S = 1  # what a 429 asks clients to wait


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, status: int = 400,
               kind: str = 'invalid_request_error', code: str | None = None):
    super().__init__(message)
    self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_response(error: BadRequest, headers=None) -> JSONResponse:
  body = {'message': error.message, 'type': error.kind, 'param': error.param, 'code': error.code}
  return JSONResponse({'error': body}, status_code=error.status, headers=headers)


def _field(body: dict, name: str, types, default=None, required=False):
  """body[name], checked against `types` (bool is never a number here)."""
  if name not in body or body[name] is None:
    if required:
      raise BadRequest(f"'{name}' is required.", name)
    return default
  value = body[name]
  if isinstance(value, bool) and bool not in types or not isinstance(value, types):
    names = ' or '.join(t.__name__ for t in types)
    raise BadRequest(f"'{name}' must be {names}, got {type(value).__name__}.", name)
  return value


def _prompt_ids(body: dict, tokenizer) -> list[int]:
  """The prompt as token ids: text gets BOS in front (as eval.py does); ids are kept as given."""
  prompt = _field(body, 'prompt', (str, list), required=True)
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str):
    return [tokenizer.bos_id] + tokenizer.encode(prompt)
  if not prompt or not all(
      isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size
      for t in prompt):
    raise BadRequest(
        "'prompt' must be a string, or a non-empty list of token ids below "
        f'{tokenizer.vocab_size}; batches of several prompts are not served (send one each).',
        'prompt')
  return list(prompt)


class Server:
  """The routes over one engine, tokenizer and model name."""
  def __init__(self, engine, tokenizer, model_name: str, metrics, api_key: str = '',
               max_tokens_cap: int = 1024, chat_template: str = ''):
    """chat_template: a built-in template's name (data.chat_template), '' for the tokenizer's."""
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.metrics, self.api_key, self.max_tokens_cap = metrics, api_key, max_tokens_cap
    self.chat_template = chat_template
    self.created = int(time.time())
    self._mailbox = None  # engine events to the event loop

  def app(self) -> Starlette:
    return Starlette(
        exception_handlers={HTTPException: _route_error}, routes=[
            Route('/health', self.health),
            Route('/metrics', self.prometheus),
            Route('/v1/models', self.models),
            Route('/v1/completions', self.completions, methods=['POST']),
            Route('/v1/chat/completions', self.chat_completions, methods=['POST']),
        ])

  async def health(self, _):
    return JSONResponse({'status': 'ok'})

  async def prometheus(self, _):
    return Response(self.metrics.exposition(), media_type='text/plain; version=0.0.4')

  async def models(self, http: HttpRequest):
    try:
      self._authorize(http)
    except BadRequest as error:
      return self._answer('models', error_response(error))
    return self._answer(
        'models',
        JSONResponse({
            'object': 'list',
            'data': [{
                'id': self.model_name,
                'object': 'model',
                'created': self.created,
                'owned_by': 'llama_jax'
            }]
        }))

  async def completions(self, http: HttpRequest):
    return await self._serve(http, 'completions', self._completion_request)

  async def chat_completions(self, http: HttpRequest):
    return await self._serve(http, 'chat_completions', self._chat_request)

  async def _serve(self, http: HttpRequest, endpoint: str, parse):
    """Checks and queues the request `parse` reads from the body, then answers it."""
    try:
      self._authorize(http)
      body = await self._json(http)
      request, text, options = parse(body)
      events = self._submit(request)
    except BadRequest as error:
      headers = {'Retry-After': str(RETRY_AFTER_S)} if error.status == 429 else None
      return self._answer(endpoint, error_response(error, headers))
    if options['stream']:
      return self._answer(
          endpoint,
          StreamingResponse(self._stream(request, events, text, options),
                            media_type='text/event-stream'))
    pieces, logprobs = [], _Logprobs(self.tokenizer, options['logprobs'])
    reason = None
    try:
      while reason is None:
        if await http.is_disconnected():  # nobody is waiting for the answer: free the slot
          return self._answer(endpoint, Response(status_code=499))
        pieces, reason = await self._next(request, events, text, logprobs, pieces)
    finally:  # also when the server gives up on this request at shutdown
      request.cancelled.set()
    if reason == 'error':
      return self._answer(
          endpoint,
          error_response(BadRequest('generation failed on the server.', None, 500, 'server_error')))
    if options['chat']:
      choice = {'message': {'role': 'assistant', 'content': ''.join(pieces)}, 'logprobs': None}
    else:
      choice = {'text': ''.join(pieces), 'logprobs': logprobs.body()}
    choice = {'index': 0, **choice, 'finish_reason': reason}
    return self._answer(endpoint,
                        JSONResponse(self._envelope(options, [choice], usage=self._usage(request))))

  async def _stream(self, request, events, text, options):
    """Server-sent events: one chunk per piece of text, the finish reason, [DONE] (a chat
    stream starts with the assistant's role, as OpenAI's does)."""
    logprobs = _Logprobs(self.tokenizer, options['logprobs'])
    reason = None
    try:
      if options['chat']:
        delta = {'role': 'assistant', 'content': ''}
        yield _sse(self._envelope(options, [_chunk_choice(options, delta, None, None)]))
      while reason is None:
        pieces, reason = await self._next(request, events, text, logprobs, [])
        if pieces or reason:
          piece, finish = ''.join(pieces), reason if reason != 'error' else 'stop'
          if options['chat']:
            choice = _chunk_choice(options, {'content': piece} if piece else {}, None, finish)
          else:
            choice = _chunk_choice(options, piece, logprobs.take(), finish)
          yield _sse(self._envelope(options, [choice]))
      if options['include_usage']:
        yield _sse(self._envelope(options, [], usage=self._usage(request)))
      yield 'data: [DONE]\n\n'
    finally:  # the client went away (or we are done): the slot is freed at the next step
      request.cancelled.set()

  async def _next(self, request, events, text: TextStream, logprobs, pieces):
    """Waits for the engine's next event and takes the ones already behind it too (when the
    engine is ahead of the HTTP layer they become one chunk): (pieces of text so far, finish
    reason or None)."""
    event = await events.get()
    while True:
      if isinstance(event, engine_lib.Finished):
        reason = 'length' if event.reason == 'length' else event.reason
        return pieces + [text.finish()], 'stop' if reason in ('stop', 'cancelled') else reason
      pieces = pieces + [text.add(event.id)]
      logprobs.add(event)
      if text.stopped:
        request.cancelled.set()
        return pieces, 'stop'
      if events.empty():
        return pieces, None
      event = events.get_nowait()

  def _authorize(self, http: HttpRequest):
    if not self.api_key:
      return
    header = http.headers.get('authorization', '')
    if not hmac.compare_digest(header.encode(), f'Bearer {self.api_key}'.encode()):
      raise BadRequest('a valid API key is required (header "Authorization: Bearer KEY").', None,
                       401, 'invalid_request_error', 'invalid_api_key')

  async def _json(self, http: HttpRequest) -> dict:
    try:
      body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise BadRequest('the request body is not valid JSON.') from None
    if not isinstance(body, dict):
      raise BadRequest('the request body must be a JSON object.')
    return body

  def _completion_request(self, body: dict):
    self._check_model(body)
    prompt = _prompt_ids(body, self.tokenizer)
    if _field(body, 'echo', (bool,), False):
      raise BadRequest("'echo' is not supported.", 'echo')
    logprobs = _field(body, 'logprobs', (int,), None)
    if logprobs is not None and not 0 <= logprobs <= engine_lib.TOP_LOGPROBS:
      raise BadRequest(f"'logprobs' must be between 0 and {engine_lib.TOP_LOGPROBS}.", 'logprobs')
    max_tokens = _field(body, 'max_tokens', (int,), 16)
    return self._generation_request(body, prompt, max_tokens, dict(chat=False, logprobs=logprobs))

  def _chat_request(self, body: dict):
    self._check_model(body)
    messages = _field(body, 'messages', (list,), required=True)
    if not messages or not all(isinstance(m, dict) for m in messages):
      raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects.",
                       'messages')
    if _field(body, 'logprobs', (bool,), False):
      raise BadRequest("'logprobs' is not supported for chat; use /v1/completions.", 'logprobs')
    try:
      prompt, _ = chat.render(self.tokenizer, [{
          'role': m.get('role'),
          'content': m.get('content')
      } for m in messages], template_name=self.chat_template, add_generation_prompt=True)
    except UserError as error:
      raise BadRequest(str(error), 'messages') from None
    # max_completion_tokens is the newer name of max_tokens.
    max_tokens = _field(body, 'max_completion_tokens', (int,), None)
    max_tokens = _field(body, 'max_tokens', (int,), 16) if max_tokens is None else max_tokens
    return self._generation_request(body, prompt, max_tokens, dict(chat=True, logprobs=None))

  def _check_model(self, body: dict):
    model = _field(body, 'model', (str,), required=True)
    if model != self.model_name:
      raise BadRequest(f"model '{model}' is not served here; use '{self.model_name}'.", 'model',
                       code='model_not_found')

  def _generation_request(self, body: dict, prompt: list[int], max_tokens: int, options: dict):
    """The engine Request, its TextStream and the answer's options, from the fields that
    both endpoints share."""
    if not 1 <= max_tokens <= self.max_tokens_cap:
      raise BadRequest(f"'max_tokens' must be between 1 and {self.max_tokens_cap}.", 'max_tokens')
    if len(prompt) + max_tokens > self.engine.max_len:
      raise BadRequest(
          f'the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceed the '
          f"model's {self.engine.max_len} tokens; shorten the prompt or lower max_tokens.",
          'max_tokens', code='context_length_exceeded')
    temperature = float(_field(body, 'temperature', (int, float), 1.0))
    if not 0 <= temperature <= 2:
      raise BadRequest("'temperature' must be between 0 and 2.", 'temperature')
    top_p = float(_field(body, 'top_p', (int, float), 1.0))
    if not 0 < top_p <= 1:
      raise BadRequest("'top_p' must be above 0 and at most 1.", 'top_p')
    if _field(body, 'n', (int,), 1) != 1:
      raise BadRequest("only 'n' = 1 is served; send several requests instead.", 'n')
    stop = _field(body, 'stop', (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
      raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings.", 'stop')
    seed = _field(body, 'seed', (int,), None)
    stream = _field(body, 'stream', (bool,), False)
    stream_options = _field(body, 'stream_options', (dict,), {})
    request = engine_lib.Request(prompt, max_tokens, deliver=None, temperature=temperature,
                                 top_p=top_p,
                                 seed=(random.randrange(2**31) if seed is None else seed % 2**31),
                                 stop_ids=self.tokenizer.stop_ids, logprobs=(options['logprobs']
                                                                             is not None))
    options = dict(options, stream=stream, include_usage=bool(stream_options.get('include_usage')),
                   id=f'{"chatcmpl" if options["chat"] else "cmpl"}-{uuid.uuid4().hex}',
                   created=int(time.time()))
    return request, TextStream(self.tokenizer, stop), options

  def _submit(self, request) -> asyncio.Queue:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    if self._mailbox is None or self._mailbox.loop is not loop:
      self._mailbox = _Mailbox(loop)
    request.deliver = functools.partial(self._mailbox.post, events)
    try:
      self.engine.submit(request)
    except engine_lib.QueueFull:
      raise BadRequest(
          f'the server is busy ({self.engine.max_queue} requests waiting); retry '
          f'in {RETRY_AFTER_S} s.', None, 429, 'rate_limit_error', 'rate_limit_exceeded') from None
    return events

  def _envelope(self, options, choices, usage=None) -> dict:
    body = {
        'id': options['id'],
        'object': ('chat.completion' if options['chat'] else 'text_completion') +
                  ('.chunk' if options['stream'] and options['chat'] else ''),
        'created': options['created'],
        'model': self.model_name,
        'choices': choices
    }
    if usage is not None:
      body['usage'] = usage
    return body

  def _usage(self, request) -> dict:
    return {
        'prompt_tokens': len(request.prompt),
        'completion_tokens': request.generated,
        'total_tokens': len(request.prompt) + request.generated
    }

  def _answer(self, endpoint: str, response: Response) -> Response:
    self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


class _Mailbox:
  """Hands the engine thread's events to the event loop's queues, waking the loop once for
  all the events posted until it runs (a decode step posts a token to every busy slot), not
  once per token."""
  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self._lock = threading.Lock()
    self._pending = []  # (queue, event), in order

  def post(self, queue: asyncio.Queue, event):
    """Engine thread: queues `event` for `queue` (RuntimeError once the loop has closed)."""
    with self._lock:
      self._pending.append((queue, event))
      if len(self._pending) > 1:
        return  # a wakeup is on its way
    self.loop.call_soon_threadsafe(self._hand_over)

  def _hand_over(self):
    with self._lock:
      pending, self._pending = self._pending, []
    for queue, event in pending:
      queue.put_nowait(event)


class _Logprobs:
  """The completions API's `logprobs` object, built token by token (None when not asked)."""
  def __init__(self, tokenizer, top: int | None):
    self.tokenizer, self.top = tokenizer, top
    self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
    self._taken, self._offset = 0, 0

  def add(self, token: engine_lib.Token):
    if self.top is None:
      return
    piece = self.tokenizer.decode([token.id])
    self.tokens.append(piece)
    self.token_logprobs.append(token.logprob)
    self.top_logprobs.append({
        self.tokenizer.decode([i]): lp for i, lp in token.top[:self.top]
    } if self.top else None)
    self.text_offset.append(self._offset)
    self._offset += len(piece)

  def body(self, start: int = 0):
    if self.top is None:
      return None
    return {
        'tokens': self.tokens[start:],
        'token_logprobs': self.token_logprobs[start:],
        'top_logprobs': self.top_logprobs[start:],
        'text_offset': self.text_offset[start:]
    }

  def take(self):
    """The entries added since the last take (for a streamed chunk)."""
    start, self._taken = self._taken, len(self.tokens)
    return self.body(start)


async def _route_error(_, error: HTTPException) -> JSONResponse:
  """An unknown path or method, in the same error body as every other error."""
  return error_response(BadRequest(f'{error.detail}.', status=error.status_code))


def _chunk_choice(options, content, logprobs, finish_reason) -> dict:
  """A streamed choice: a chat `delta`, or a completion's text and logprobs."""
  if options['chat']:
    return {'index': 0, 'delta': content, 'logprobs': None, 'finish_reason': finish_reason}
  return {'text': content, 'index': 0, 'logprobs': logprobs, 'finish_reason': finish_reason}


def _sse(payload: dict) -> str:
  return f'data: {json.dumps(payload)}\n\n'
