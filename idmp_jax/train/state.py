"""The training state and the optimizer step every LoRA job shares (UNet and LLaVA-NeXT alike).

A job supplies its loss, `loss_fn(trainable, frozen, batch, key) -> (loss, counts)` where `counts` holds the
step's sizes as scalars ("examples" = real rows; optionally "tokens"); `make_train_step` adds the gradient, the
optimizer update and the in-memory NaN guard, so the two jobs cannot drift apart on them.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from idmp_jax.train import optimizer as optim


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data iterator: the step, the trainable LoRA leaves (fp32), the optimizer
  state and the base RNG key (raw uint32 key data, so Orbax stores it as a plain array). Step k draws its
  randomness from fold_in(rng, k), so a resumed run repeats an uninterrupted one."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
  """Step 0: `params` the trainable tree, `rng` the base key of the step randomness (a typed key)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(rng))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, schedule: Callable, *,
                    flat: bool = False):
  """(state, frozen, batch) -> (state, metrics): loss, grad_norm (before clipping; `optimizer.global_norm`, `flat`
  when the optimizer is flattened), lr of this step, and the loss's counts. A non-finite loss or gradient leaves
  params and optimizer state as they were (the loop stops on it; the guard only keeps the in-memory state clean)."""

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
    grad_norm = optim.global_norm(grads, flat)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **counts}
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state)), metrics

  return step
