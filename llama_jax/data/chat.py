"""Chat templates: a conversation -> token ids and loss weights (1 on what the assistant says).

The template is the tokenizer's own Jinja `chat_template` (tokenizer_config.json), rendered
as `transformers`' `apply_chat_template` renders it (a sandboxed, immutable Jinja
environment with trim_blocks, lstrip_blocks, loop controls, `raise_exception` and `tojson`),
or a built-in `llama2` / `llama3` template named by data.chat_template.

Weights: each assistant turn is the text that rendering the conversation up to and
including it adds to rendering it up to the turn before with a generation prompt, i.e. the
turn's content and its end token; those tokens weigh 1, everything else (system, user,
headers) 0. Special-token strings in the rendered text become their ids; the text between
them is encoded piece by piece, split where a weight changes.
"""

import functools
import json
import re

import jinja2
import jinja2.ext
import jinja2.sandbox

from llama_jax.errors import UserError

ROLES = ('system', 'user', 'assistant')

# Meta's Llama 3 format: a header per message, <|eot_id|> ends each turn.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
          "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
# Meta's Llama 2 chat format: [INST] ... [/INST] answer </s>, the system prompt in <<SYS>>.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\\n' + "
          "messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}"
          "{% else %}{% set system = '' %}{% endif %}{% for message in messages %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if loop.first "
          "else '') + message['content'] | trim + ' [/INST]' }}{% else %}"
          "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
BUILTIN = {'llama2': LLAMA2, 'llama3': LLAMA3}


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                             extensions=[jinja2.ext.loopcontrols])
  environment.filters['tojson'] = _tojson
  environment.globals['raise_exception'] = _raise_exception
  try:
    return environment.from_string(template)
  except jinja2.exceptions.TemplateError as error:
    raise UserError(f'the chat template is not valid Jinja ({error}); fix it or set '
                    'data.chat_template to llama2 or llama3.') from None


def template_of(tokenizer, template_name: str = '') -> str:
  """The Jinja source: the built-in one named (llama2 | llama3), else the tokenizer's own."""
  if template_name:
    if template_name not in BUILTIN:
      raise UserError(f'data.chat_template is {template_name!r}; use one of '
                      f'{", ".join(BUILTIN)}, or empty for the tokenizer\'s own template.')
    return BUILTIN[template_name]
  if not getattr(tokenizer, 'chat_template', None):
    raise UserError('the tokenizer has no chat template (no chat_template in its '
                    'tokenizer_config.json); set data.chat_template to llama2 or llama3.')
  return tokenizer.chat_template


def _check(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError(f'a conversation must be a non-empty list of messages, got {messages!r:.80}.')
  for message in messages:
    if not isinstance(message, dict) or not isinstance(message.get('content'), str):
      raise UserError(f'each message needs a "role" and a string "content", got {message!r:.80}.')
    if message.get('role') not in ROLES:
      raise UserError(f'unknown role {message.get("role")!r} in a conversation; roles are '
                      f'{", ".join(ROLES)}.')


def render_text(tokenizer, messages, *, template_name: str = '',
                add_generation_prompt: bool = False) -> str:
  """The conversation through the chat template, as text (special tokens spelled out)."""
  _check(messages)
  names = {i: s for s, i in tokenizer.special_tokens.items()}
  template = _compile(template_of(tokenizer, template_name))
  try:
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=names.get(tokenizer.bos_id,
                                               ''), eos_token=names.get(tokenizer.eos_id, ''))
  except Exception as error:  # the template's own raise_exception, or any Jinja failure
    raise UserError(f'the chat template failed to render a conversation ({error}); check its '
                    'roles and order, or set data.chat_template to llama2 or llama3.') from None


def _encode(tokenizer, text: str) -> list[int]:
  """Ids of `text`, its special-token strings as their ids and the rest encoded."""
  specials = tokenizer.special_tokens
  if not specials:
    return tokenizer.encode(text) if text else []
  pattern = '(' + '|'.join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ')'
  ids = []
  for i, piece in enumerate(re.split(pattern, text)):
    if i % 2:
      ids.append(specials[piece])
    elif piece:
      ids += tokenizer.encode(piece)
  return ids


def render(tokenizer, messages, *, template_name: str = '',
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, weights) of a conversation: weights 1 on assistant content + end token, else 0.

  With add_generation_prompt=True the ids end with the assistant header (for generation)
  and every weight is 0; otherwise the conversation must have an assistant turn.
  """
  options = dict(template_name=template_name)
  full = render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt, **options)
  if add_generation_prompt:
    ids = _encode(tokenizer, full)
    return ids, [0] * len(ids)
  turns = [i for i, message in enumerate(messages) if message['role'] == 'assistant']
  if not turns:
    raise UserError('a conversation has no assistant turn, so nothing to learn from; give each '
                    'one at least one {"role": "assistant", ...} message.')
  pieces, done = [], 0  # (text, weight), covering `full` in order
  for i in turns:
    before = render_text(tokenizer, messages[:i], add_generation_prompt=True, **
                         options) if i else ''
    after = render_text(tokenizer, messages[:i + 1], **options)
    if not (full.startswith(after) and after.startswith(before) and len(before) >= done):
      raise UserError('the chat template does not render a conversation as the renderings of '
                      'its beginnings followed by each new turn, so assistant turns cannot be '
                      'found; set data.chat_template to llama2 or llama3.')
    pieces += [(full[done:len(before)], 0), (full[len(before):len(after)], 1)]
    done = len(after)
  pieces.append((full[done:], 0))
  ids, weights = [], []
  for text, weight in pieces:
    piece_ids = _encode(tokenizer, text)
    ids += piece_ids
    weights += [weight] * len(piece_ids)
  return ids, weights
