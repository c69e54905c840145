"""The original's optimizer, in optax: torch AdamW + accelerate's clip_grad_norm_ + diffusers'
`constant_with_warmup` schedule. It only ever sees the trainable tree (the LoRA leaves), so no masking is needed
and frozen weights carry no optimizer state."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def constant_with_warmup(lr: float, warmup_steps: float) -> optax.Schedule:
  """diffusers' get_constant_schedule_with_warmup: lr * step / max(1, warmup) while step < warmup, then lr.
  `warmup_steps` may be fractional (the original's 1% of an epoch: 28.84), so lr is 0 at step 0."""
  warmup = float(warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return lr * jnp.where(step < warmup, step / max(1.0, warmup), 1.0)

  return schedule


class ClipState(NamedTuple):
  pass


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)) (optax's version omits the 1e-6)."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: ClipState(), update)


def make_optimizer(config, steps_per_epoch: int, total_steps: int | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW(b1, b2, eps, weight decay) on a constant-with-warm-up schedule after global-norm clipping.

  config: lr, the warm-up as warmup_fraction_of_epoch (fraction x ONE epoch's update steps, SPEC §5) or
  warmup_fraction_of_run (fraction x `total_steps`, SPEC §9), adam_b1, adam_b2, adam_eps, weight_decay,
  grad_clip (<= 0: off), and optionally flatten (see `global_norm`).
  """
  if "warmup_fraction_of_run" in config:
    if total_steps is None:
      raise ValueError("warmup_fraction_of_run needs the run's total_steps")
    warmup = config.warmup_fraction_of_run * total_steps
  else:
    warmup = config.warmup_fraction_of_epoch * steps_per_epoch
  schedule = constant_with_warmup(config.lr, warmup)
  chain = []
  if config.grad_clip > 0:
    chain.append(clip_by_global_norm_torch(config.grad_clip))
  # optax.adamw = torch AdamW: m / (sqrt(v_hat) + eps) with bias correction, decoupled decay p -= lr * wd * p.
  chain.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay))
  tx = optax.chain(*chain)
  if flattened(config):
    # The same math on the leaves concatenated into one vector. The SD-2 UNet's LoRA tree has 256 small leaves
    # (3.3M weights): per leaf, the norm's reductions and AdamW's updates were ~560 tiny kernels a step (~1 ms
    # of kernels at b32 on an H200, plus a launch each). Only for replicated trees: a concatenation of sharded
    # leaves would gather them (the LLaVA job shards its adapters' moments like the base).
    tx = optax.flatten(tx)
  return tx, schedule


def flattened(config) -> bool:
  """Whether `make_optimizer(config, ...)` flattens; the UNet job then keeps its LoRA leaves as one vector too
  (`state.init_state(flat=True)`), where the flattened optimizer's concatenation is a no-op."""
  return bool(config.get("flatten", False))


def global_norm(tree, flat: bool = False) -> jax.Array:
  """The gradient's global L2 norm: per leaf (optax.tree.norm), or, with `flat`, of the leaves concatenated as
  optax.flatten concatenates them (one reduction, and the same expression as a flattened clip's, so XLA computes
  it once). The two differ only in fp32 summation order."""
  if not flat:
    return optax.tree.norm(tree)
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate([jnp.reshape(x, [-1]) for x in leaves]))))
