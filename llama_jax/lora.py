"""LoRA (Hu et al. 2021): low-rank adapters on the frozen projections of a pretrained model.

A projection y = x @ W becomes y = x @ W + (alpha / rank) * (x @ A) @ B, with
A: [*in, rank] and B: [rank, *out] (W: [*in, *out]). B starts at zero, so an adapted model
starts as its base. The adapters live beside the weights they adapt (`wq_lora_a`,
`wq_lora_b`), inherit their logical axes (the rank axis is replicated) and, built inside
the stacked blocks, their leading `layers` axis: the scan over layers stays one loop.

Only the adapters train: `Adapter` is the variable type that the train state splits off
(steps.py); the rest of the model is frozen, held in the compute dtype, with no optimizer
state.
"""

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from llama_jax.errors import ConfigError
from llama_jax.projection import project

TARGETS = ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')  # every projection of a block


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 0  # 0: no adapters (every parameter trains)
  alpha: float = 16.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = ('wq', 'wk', 'wv', 'wo')

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))
    if self.rank < 0:
      raise ConfigError(f'model.lora.rank must be 0 (off) or positive, got {self.rank}.')
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or (self.rank and not self.targets):
      raise ConfigError(f'model.lora.targets {list(self.targets)} must be a non-empty selection '
                        f'of {", ".join(TARGETS)}.')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


class Adapter(nnx.Param):
  """A trainable LoRA factor; every other parameter of an adapted model is frozen."""


def add_adapters(module: nnx.Module, names, config: LoRAConfig, contract: dict, rngs: nnx.Rngs):
  """Gives `module` the factors A (random) and B (zeros) of each targeted weight in `names`.

  contract: weight name -> how many leading axes of the weight are its input.
  """
  if not config.rank:
    return
  for name in names:
    if name not in config.targets:
      continue
    weight = getattr(module, name)
    n_in = contract.get(name, 1)
    shape, axes = weight.shape, weight.get_metadata()['out_sharding']
    fan_in = math.prod(shape[:n_in])
    a = nnx.initializers.normal(1 / math.sqrt(fan_in))(rngs.params(), (*shape[:n_in], config.rank),
                                                       jnp.float32)
    setattr(module, f'{name}_lora_a',
            Adapter(a, out_sharding=(*axes[:n_in], None), eager_sharding=False))
    setattr(
        module, f'{name}_lora_b',
        Adapter(jnp.zeros((config.rank, *shape[n_in:]), jnp.float32),
                out_sharding=(None, *axes[n_in:]), eager_sharding=False))


def delta(module: nnx.Module, name: str, x, scale: float):
  """(x @ A) @ B * scale for the adapted weight `name`, or 0 when it has no adapter.

  x: [batch, length, *in] in the compute dtype -> [batch, length, *out].
  """
  a = getattr(module, f'{name}_lora_a', None)
  if a is None:
    return 0
  a, b = a[...].astype(x.dtype), getattr(module, f'{name}_lora_b')[...].astype(x.dtype)
  low = project(x, a, contract=a.ndim - 1)  # [batch, length, rank]
  return project(low * jnp.asarray(scale, x.dtype), b)


def merged_weight(weight, a, b, scale: float):
  """W + scale * A @ B in float32, for one weight (any leading `layers` axes included)."""
  n_lead = a.ndim + b.ndim - 2 - weight.ndim  # the stacked axes, e.g. [layers]
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  lead = a32.shape[:n_lead]
  in_shape, out_shape = a32.shape[n_lead:-1], b32.shape[n_lead + 1:]
  a2 = a32.reshape(*lead, math.prod(in_shape), -1)
  b2 = b32.reshape(*lead, b32.shape[n_lead], -1)
  update = jnp.matmul(a2, b2).reshape(*lead, *in_shape, *out_shape)
  return jnp.asarray(weight, jnp.float32) + scale * update


def merge(params: nnx.State, config: LoRAConfig) -> nnx.State:
  """The base model's parameters with every adapter folded in (float32): W + scale * A @ B."""
  flat = dict(nnx.to_flat_state(params))
  merged = {}
  for path, variable in flat.items():
    if isinstance(variable, Adapter):
      continue
    a = flat.get((*path[:-1], f'{path[-1]}_lora_a'))
    if a is not None:
      b = flat[(*path[:-1], f'{path[-1]}_lora_b')]
      variable = variable.replace(merged_weight(variable[...], a[...], b[...], config.scale))
    merged[path] = variable
  return nnx.from_flat_state(merged)
