"""The optimizer of the LLaMA paper: clipped AdamW with linear warmup and cosine decay."""

import jax
import optax


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


def make_optimizer(optim_config, train_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim_config.clip_norm),
      optax.adamw(learning_rate_schedule(optim_config, train_steps), b1=optim_config.b1,
                  b2=optim_config.b2, eps=optim_config.eps, weight_decay=optim_config.weight_decay,
                  mask=lambda params: weight_decay_mask(params, optim_config.decay_embeddings)))
