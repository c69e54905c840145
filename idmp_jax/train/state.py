"""The training state and the optimizer step every LoRA job shares (UNet and LLaVA-NeXT alike).

A job supplies its loss, `loss_fn(trainable, frozen, batch, key) -> (loss, counts)` where `counts` holds the
step's sizes as scalars ("examples" = real rows; optionally "tokens"); `make_train_step` adds the gradient, the
optimizer update and the in-memory NaN guard, so the two jobs cannot drift apart on them.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from idmp_jax.train import optimizer as optim


class FlatLayout:
  """Where each leaf of a tree sits in one vector: the leaves in `jax.tree.leaves` order, each raveled (optax.flatten's
  order, so a flattened optimizer's state lines up with it). Hashable: a static field of `TrainState`."""

  def __init__(self, template):
    leaves, self.treedef = jax.tree.flatten(template)
    self.shapes = tuple(tuple(x.shape) for x in leaves)
    self.dtypes = tuple(jnp.dtype(x.dtype) for x in leaves)
    if len(set(self.dtypes)) > 1:
      raise ValueError(f"FlatLayout: leaves of several dtypes {sorted(set(map(str, self.dtypes)))}; one vector "
                       "holds one dtype")

  def _key(self):
    return self.treedef, self.shapes, self.dtypes

  def __eq__(self, other):
    return isinstance(other, FlatLayout) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def ravel(self, tree) -> jax.Array:
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != self.treedef or tuple(tuple(x.shape) for x in leaves) != self.shapes:
      raise ValueError("FlatLayout.ravel: the tree's structure or leaf shapes differ from the layout's")
    return jnp.concatenate([jnp.reshape(x, [-1]) for x in leaves])

  def unravel(self, flat: jax.Array):
    """The tree, each leaf a slice of `flat` (inside a jit, XLA fuses each slice into the leaf's consumers); its
    gradient is the leaves' cotangents concatenated (`_split`)."""
    return jax.tree.unflatten(self.treedef, _split(self, flat))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split(layout: FlatLayout, flat: jax.Array) -> tuple[jax.Array, ...]:
  """`flat` cut into the layout's leaves. A custom VJP because autodiff transposes each slice into a pad of the
  whole vector and sums the pads: for the UNet's 256 LoRA leaves XLA fused that into chains of 256 padded adds
  per element (~0.9 ms a step at b32 on an H200, against ~10 us for the concatenation)."""
  out, start = [], 0
  for shape in layout.shapes:
    size = math.prod(shape)
    out.append(jnp.reshape(flat[start:start + size], shape))
    start += size
  return tuple(out)


def _split_fwd(layout, flat):
  return _split(layout, flat), None


def _split_bwd(layout, _, cotangents):
  return (layout.ravel(jax.tree.unflatten(layout.treedef, cotangents)),)


_split.defvjp(_split_fwd, _split_bwd)


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data iterator: the step, the trainable LoRA leaves (fp32), the optimizer
  state and the base RNG key (raw uint32 key data, so Orbax stores it as a plain array). Step k draws its
  randomness from fold_in(rng, k), so a resumed run repeats an uninterrupted one.

  With a `layout` (`init_state(..., flat=True)`) `params` is the trainable tree as one vector (`FlatLayout`), and
  `trainable()` gives the tree. Why: the step's update and NaN guard write every leaf; per leaf that was 260 tiny
  kernels a step for the SD-2 UNet's 256 LoRA leaves (0.4 ms at b32 on an H200), on one vector a few."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  layout: FlatLayout | None = flax.struct.field(pytree_node=False, default=None)

  def trainable(self):
    """The trainable tree (unravelled from the vector when `params` is flat)."""
    return self.params if self.layout is None else self.layout.unravel(self.params)


def init_state(params, optimizer: optax.GradientTransformation, rng, *, flat: bool = False) -> TrainState:
  """Step 0: `params` the trainable tree, `rng` the base key of the step randomness (a typed key); `flat`: keep the
  tree as one vector (`TrainState.layout`; for replicated trees: a concatenation of sharded leaves would gather
  them)."""
  layout = FlatLayout(params) if flat else None
  if layout is not None:
    params = layout.ravel(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(rng), layout=layout)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, schedule: Callable):
  """(state, frozen, batch) -> (state, metrics): loss, grad_norm (before clipping; `optimizer.global_norm`), lr of
  this step, and the loss's counts. A non-finite loss or gradient leaves params and optimizer state as they were
  (the loop stops on it; the guard only keeps the in-memory state clean). `loss_fn` takes the trainable tree
  whether the state keeps it as a tree or flat (`TrainState.layout`); the gradient, update and guard then run on
  the state's own form."""

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss_of = loss_fn if state.layout is None else (
        lambda flat, *args: loss_fn(state.layout.unravel(flat), *args))
    (loss, counts), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, frozen, batch, key)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **counts}
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state)), metrics

  return step
