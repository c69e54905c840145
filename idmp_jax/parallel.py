"""The device mesh and the sharding rules: the one place that knows how arrays are laid out over devices.

Mesh axes are ("data", "fsdp", "tensor"). Batches shard over ("data", "fsdp"). Parameters shard by rules:
an ordered list of (regex over the '/'-joined param path, tactic), first match wins, where a tactic is
  "replicate"  every device holds the whole array (the default for everything), or
  "fsdp"       the largest axis divisible by the fsdp axis size is split over "fsdp" (replicated if none is).
A config names a preset of SHARDING_PRESETS ("fsdp": the large frozen kernels of SD-2) or spells its own rules.
The same config runs on 1 CPU, 8 forced host devices, one GPU or a pod slice: only mesh sizes change.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(config) -> None:
  """Starts jax.distributed for multi-process runs (one process per host), before anything touches devices.

  Enabled by `config.distributed.coordinator_address` (with num_processes and process_id), or by the
  environment jax.distributed reads itself on managed clusters (JAX_COORDINATOR_ADDRESS, SLURM, TPU pods).
  """
  dist = config.get("distributed", None)
  address = dist.get("coordinator_address", "") if dist else ""
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=dist.num_processes,
                               process_id=dist.process_id,
                               local_device_ids=dist.get("local_device_ids", None) or None)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Axis sizes from `config.mesh` (data/fsdp/tensor; one of them may be -1 = all remaining devices)."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                       f"by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are present")
  return tuple(sizes)


def make_mesh(config) -> Mesh:
  mesh_config = config.get("mesh", None) or {"data": -1}
  shape = mesh_shape(mesh_config, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ValueError(f"batch size {global_batch} is not divisible by the {shards} batch shards of the mesh "
                     f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by {jax.process_count()} processes")
  return global_batch // jax.process_count()


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host-local NumPy batch (this process's rows) -> global jax.Arrays sharded over the batch axes."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)


def _fsdp_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """The largest axis of `shape` divisible by the fsdp size goes over "fsdp"; with none divisible (a 3x3 conv's
  4 output channels over 8 devices, a scalar) the leaf replicates rather than padding."""
  n = mesh.shape["fsdp"]
  if n == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):  # stable: the first of equal sizes
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


TACTICS = ("replicate", "fsdp")

# Named rule sets: `config.sharding_rules = "fsdp"` picks one, a sequence of (regex, tactic) pairs spells its own.
# "fsdp" is for the frozen SD-2 weights (UNet, VAE encoder, text encoder): every Linear/Conv kernel and the token
# embedding split over the fsdp axis; biases, norm scales, position embeddings and LoRA's leaves (lora_a/lora_b
# and their scalars are not kernels) replicate, as does any leaf under `min_size` elements (param_shardings).
SHARDING_PRESETS = {
    "replicate": (),
    "fsdp": ((r"(^|/)(kernel|token_embedding/embedding)$", "fsdp"),),
}


def sharding_rules(value, field: str = "config.sharding_rules") -> tuple[tuple[str, str], ...]:
  """Rules from a config value: a preset name of SHARDING_PRESETS, or (regex, tactic) pairs; `field` names the
  config entry in errors."""
  if isinstance(value, str):
    if value not in SHARDING_PRESETS:
      raise ValueError(f"{field} = {value!r}: not a preset (one of {sorted(SHARDING_PRESETS)}) nor a sequence of "
                       "(regex, tactic) pairs")
    return SHARDING_PRESETS[value]
  rules = []
  for rule in value or ():
    if isinstance(rule, str) or len(rule) != 2 or rule[1] not in TACTICS:
      raise ValueError(f"{field}: rule {rule!r} is not a (regex, tactic) pair with tactic in {TACTICS}")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"{field}: rule {rule!r}: bad regex ({e})") from None
    rules.append((str(rule[0]), str(rule[1])))
  return tuple(rules)


def path_name(path) -> str:
  """A tree path as the rules see it: dict keys, attribute names and sequence indices joined by '/'
  (TrainState's `params/down_blocks_0/.../lora_a`, `opt_state/0/mu/down_blocks_0/.../lora_a`)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = (), *,
                    min_size: int = 0) -> Any:
  """A tree of NamedShardings for `abstract_params` from (regex, tactic) rules (re.search over `path_name`, first
  match wins); unmatched params replicate, and so do "fsdp" leaves of fewer than `min_size` elements (gathering
  a small array every step costs more latency than its copies cost memory)."""
  compiled = [(re.compile(p), t) for p, t in sharding_rules(rules, "sharding rules")]

  def spec_for(path, leaf):
    name = path_name(path)
    for regex, tactic in compiled:
      if regex.search(name):
        if tactic == "fsdp" and math.prod(leaf.shape) >= min_size:
          return NamedSharding(mesh, _fsdp_spec(leaf.shape, mesh))
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec_for, abstract_params)


def count_sharded(shardings: Any) -> tuple[int, int]:
  """(arrays, arrays split over some mesh axis) of a tree of NamedShardings (or of arrays)."""
  leaves = [getattr(x, "sharding", x) for x in jax.tree.leaves(shardings)]
  return len(leaves), sum(1 for s in leaves if any(a is not None for a in s.spec))


def log_param_shardings(shardings: Any, what: str = "params") -> None:
  total, sharded = count_sharded(shardings)
  logging.info("%s: %d arrays, %d sharded", what, total, sharded)


class FrozenWeights:
  """Weights that jitted steps read and never change (the frozen UNet, VAE and text encoder of a LoRA job), kept in
  the memory layouts XLA picks for them rather than row-major.

  Why: a frozen weight is an argument of every step, so XLA cannot hoist work on it out of the step. Flax stores a
  convolution kernel as HWIO and cuDNN reads OHWI, so each step transposed every conv kernel of the SD-2 UNet (66
  of them, ~0.8 ms a step at b32 on an H200). With `layouts="auto"` the first step compiled is compiled with the
  frozen tree's layouts left to XLA (`Layout.AUTO`), the weights are moved into the layouts it chose, once, and
  every later step takes them in those. "default": row-major.

  For fn(first, frozen_tree, *rest): `jit(fn, **jit_kwargs)` gives a callable of (first, *rest); `compile(fn, first,
  *rest, **jit_kwargs)` an executable of (first, self.tree, *rest). `tree` is the weights as the steps take them.
  """

  LAYOUTS = ("auto", "default")

  def __init__(self, tree: Any, layouts: str = "auto"):
    if layouts not in self.LAYOUTS:
      raise ValueError(f"frozen weight layouts {layouts!r}: expected one of {self.LAYOUTS}")
    self.tree = tree
    self._formats = None if layouts == "auto" else jax.tree.map(lambda x: x.sharding, tree)

  @staticmethod
  def _check(jit_kwargs):
    if "in_shardings" in jit_kwargs:
      raise ValueError("FrozenWeights: the in_shardings are FrozenWeights' (the frozen tree's formats)")

  def _jit(self, fn, n_rest: int, formats, **jit_kwargs):
    return jax.jit(fn, in_shardings=(None, formats) + (None,) * n_rest, **jit_kwargs)

  def compile(self, fn, first, *rest, **jit_kwargs):
    """fn(first, frozen, *rest) compiled for these arguments; the first compile chooses the layouts (see above)."""
    self._check(jit_kwargs)
    if self._formats is not None:
      return self._jit(fn, len(rest), self._formats, **jit_kwargs).lower(first, self.tree, *rest).compile()
    from jax.experimental.layout import Format, Layout
    auto = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), self.tree)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.tree)
    compiled = self._jit(fn, len(rest), auto, **jit_kwargs).lower(first, abstract, *rest).compile()
    self._formats = compiled.input_formats[0][1]
    self.tree = jax.device_put(self.tree, self._formats)
    return compiled

  def jit(self, fn, **jit_kwargs):
    """fn(first, frozen, *rest) as a callable of (first, *rest), compiled when first called (which chooses the
    layouts if no step has yet) and again for arguments of other shapes."""
    self._check(jit_kwargs)
    built = {}  # "first": (the first call's shapes, its executable); "jit": fn jitted for the chosen layouts.

    def shapes(args):
      return tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))

    def call(first, *rest):
      if not built:
        built["first"] = (shapes(rest), self.compile(fn, first, *rest, **jit_kwargs))
      if built["first"][0] == shapes(rest):
        return built["first"][1](first, self.tree, *rest)
      if "jit" not in built:
        built["jit"] = self._jit(fn, len(rest), self._formats, **jit_kwargs)
      return built["jit"](first, self.tree, *rest)

    return call
