"""The optimizer of the LLaMA paper: clipped AdamW with linear warmup and cosine decay."""

import jax
import jax.numpy as jnp
import optax

STATE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# bfloat16 keeps 8 significant bits: a value's neighbours are at most 2^-7 of it away. Adam's
# second moment moves by about (1 - b2) of itself per step, so b2 must leave that move at
# least one spacing, else rounding to the nearest bfloat16 discards it and nu stops following
# the gradients (b2 = 0.95, the paper's, moves it by 5%; 0.999 would lose most steps).
BFLOAT16_MAX_B2 = 1 - 2**-7


def learning_rate_schedule(optim_config, train_steps: int) -> optax.Schedule:
  """0 -> peak linearly over warmup_steps, then cosine to end_lr_fraction * peak at the end.

  The end is optim.decay_steps, or train_steps when that is 0.
  """
  peak = optim_config.learning_rate
  total_steps = optim_config.decay_steps or train_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=optim_config.warmup_steps,
      decay_steps=max(total_steps,
                      optim_config.warmup_steps + 1), end_value=peak * optim_config.end_lr_fraction)


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the matrices that decay: never norm scales; embeddings only if asked."""
  def decays(path, _):
    names = {getattr(key, 'key', getattr(key, 'name', None)) for key in path}
    if 'scale' in names:
      return False
    return decay_embeddings or not names & {'embedding', 'output'}

  return jax.tree_util.tree_map_with_path(decays, params)


def cast(tree, dtype):
  """`tree` with every floating-point leaf as `dtype` (integer leaves such as counts kept)."""
  return jax.tree.map(lambda x: x.astype(dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` with its floating-point state (Adam's mu and nu) stored in `dtype` between
  steps, and every update computed in float32 from the stored values.

  optax's own `mu_dtype` stores only the first moment; this stores both. bfloat16 has
  float32's 8-bit exponent, so nu = E[g^2] keeps its range: the square of a 1e-20 gradient
  is a normal number (float16 would flush squares below 6e-8, gradients below 2.4e-4, to
  zero, and divide by eps). What it loses is precision: 8 significant bits, a rounding
  error of at most 2^-8 (0.4%) of each stored value, so the step m / (sqrt(v) + eps) is
  off by at most about 0.6% (far less than the noise of one batch's gradient estimate),
  provided each step's change to nu is not rounded away (BFLOAT16_MAX_B2).
  """
  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config, train_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(optim_config,
                                             train_steps), b1=optim_config.b1, b2=optim_config.b2,
                      eps=optim_config.eps, weight_decay=optim_config.weight_decay,
                      mask=lambda params: weight_decay_mask(params, optim_config.decay_embeddings))
  if optim_config.state_dtype != 'float32':
    adamw = stored_as(adamw, STATE_DTYPES[optim_config.state_dtype])
  return optax.chain(optax.clip_by_global_norm(optim_config.clip_norm), adamw)
