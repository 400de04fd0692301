"""Rotary frequencies, plain (LLaMA 1/2) or scaled for longer contexts (Llama 3.1+).

`model.rope_scaling` is None (plain), or a dict naming its `type`:
  {'type': 'linear', 'factor': F}: every frequency divided by F (positions compressed F times);
  {'type': 'llama3', 'factor': F, 'low_freq_factor': L, 'high_freq_factor': H,
   'original_max_position_embeddings': N}: Meta's `apply_scaling` (Llama 3.1): wavelengths
   shorter than N / H stay, longer than N / L are divided by F, and those between are blended.
"""

import dataclasses
import math

import jax.numpy as jnp

from llama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LinearScaling:
  factor: float
  type: str = 'linear'


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int
  type: str = 'llama3'


SCALINGS = {'linear': LinearScaling, 'llama3': Llama3Scaling}


def scaling_from_dict(values) -> LinearScaling | Llama3Scaling | None:
  """The scaling a `model.rope_scaling` dict describes (None or an empty dict: plain)."""
  if values is None or isinstance(values, tuple(SCALINGS.values())):
    return values
  values = dict(values)
  if not values:
    return None
  kind = values.pop('type', None)
  if kind not in SCALINGS:
    raise ConfigError(f'model.rope_scaling type is {kind!r}; use one of {", ".join(SCALINGS)} '
                      '(or model.rope_scaling=None for the plain rotary embedding).')
  cls = SCALINGS[kind]
  keys = {f.name for f in dataclasses.fields(cls)} - {'type'}
  if set(values) != keys:
    raise ConfigError(f'model.rope_scaling of type {kind!r} takes exactly the keys '
                      f'{", ".join(sorted(keys))}; got {", ".join(sorted(values)) or "none"}.')
  scaling = cls(**values)
  if scaling.factor < 1 or (kind == 'llama3' and
                            not 0 < scaling.low_freq_factor < scaling.high_freq_factor):
    raise ConfigError(f'model.rope_scaling {values} needs factor >= 1 and (llama3) '
                      '0 < low_freq_factor < high_freq_factor.')
  return scaling


def inverse_frequencies(head_dim: int, theta: float, scaling=None):
  """theta^(-2i/head_dim) for i < head_dim/2, scaled: [head_dim / 2] float32."""
  half = head_dim // 2
  inverse_freq = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return inverse_freq
  if scaling.type == 'linear':
    return inverse_freq / scaling.factor
  context = scaling.original_max_position_embeddings
  wavelength = 2 * math.pi / inverse_freq
  # 0 where the wavelength is long (divide by factor), 1 where short (keep), linear between.
  smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor -
                                                               scaling.low_freq_factor)
  smooth = jnp.clip(smooth, 0.0, 1.0)
  return (1 - smooth) * inverse_freq / scaling.factor + smooth * inverse_freq
