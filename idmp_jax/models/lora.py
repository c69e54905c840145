"""LoRA as one transform over a Linen param tree: the base modules stay ignorant of it.

`init_lora` adds four leaves beside the `kernel` of every targeted Linear (matched by module name):

  lora_a        (in, r)  fp32, trainable   peft's A, transposed like every Flax kernel
  lora_b        (r, out) fp32, trainable   zeros, so a fresh adapter leaves the output unchanged
  lora_scale    ()       fp32, frozen      alpha / r
  lora_dropout  ()       fp32, frozen      dropout rate on the adapter's input

`idmp_jax.models.layers.Linear` calls `adapted_matmul` when its params hold `lora_a`: y = W x + b +
scale * B(A(dropout(x))), as peft's `lora.Linear`. Dropout is on only when the caller passes an rng named
`DROPOUT_RNG` to `apply` (`rngs={"lora_dropout": key}`): training passes one, inference does not. So the rate
lives in the tree (like peft's per-layer Dropout module) and the mode lives in the call, and no model code
takes a `deterministic` flag for LoRA's sake.

Also: `trainable_mask`, `split`/`merge` (gemma's `split_params`/`merge_params` contract: two disjoint nested
dicts that merge back into the original tree), `merge_lora` (fold into the kernels) / `unmerge_lora`, and the
diffusers/peft file format (`save_diffusers_lora` writes `pytorch_lora_weights.safetensors` as the original's
training script does; `load_diffusers_lora` reads it back, or peft's own key spelling), and peft adapter folders
(`save_peft_adapter` / `load_peft_adapter`: adapter_config.json + adapter_model.safetensors, what the original's
LLaVA-NeXT fine-tuning saves with `PeftModel.save_pretrained`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from idmp_jax.convert import torch_format
from idmp_jax.models import quantize

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
TRAINABLE_LEAVES = ("lora_a", "lora_b")
LORA_LEAVES = TRAINABLE_LEAVES + ("lora_scale", "lora_dropout")
DROPOUT_RNG = "lora_dropout"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"            # diffusers' LORA_ADAPTER_METADATA_KEY (diffusers >= 0.34)


def _flat(params) -> dict:
  return traverse_util.flatten_dict(torch_format._unfreeze(params))


def adapted_modules(params, targets: Sequence[str] = DEFAULT_TARGETS) -> list[tuple[str, ...]]:
  """Module paths (sorted) of the Linears whose name is in `targets`: a 2-D `kernel` under that name."""
  targets = frozenset(targets)
  return sorted(p[:-1] for p, v in _flat(params).items()
                if p[-1] == "kernel" and len(p) >= 2 and p[-2] in targets and np.ndim(v) == 2)


def init_lora(params, rng, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
              init: str = "gaussian", dropout: float = 0.0) -> dict:
  """Returns a copy of `params` with an adapter beside every targeted Linear (see the module docstring).

  init "gaussian": A ~ N(0, std=1/r) (peft: `nn.init.normal_(lora_A.weight, std=1 / r)`); "kaiming": peft's
  default, kaiming_uniform(a=sqrt(5)) on torch's (r, in) weight = U(-1/sqrt(in), 1/sqrt(in)). B = 0 either way.
  Each layer's key is folded from `rng` and the layer's position in sorted path order, so the draw does not
  depend on dict order.
  """
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
  modules = adapted_modules(params, targets)
  if not modules:
    raise ValueError(f"no Linear named one of {tuple(targets)} in the param tree")
  flat = _flat(params)
  if any(p[-1] in LORA_LEAVES for p in flat):
    raise ValueError("the param tree already holds LoRA leaves")
  out = dict(flat)
  for i, path in enumerate(modules):
    fan_in, fan_out = quantize.kernel_in_out(flat[path + ("kernel",)])
    key = jax.random.fold_in(rng, i)
    if init == "gaussian":
      a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
    elif init == "kaiming":
      bound = 1.0 / np.sqrt(fan_in)
      a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
    else:
      raise ValueError(f"LoRA init must be 'gaussian' or 'kaiming', got {init!r}")
    out[path + ("lora_a",)] = a
    out[path + ("lora_b",)] = jnp.zeros((rank, fan_out), jnp.float32)
    out[path + ("lora_scale",)] = jnp.asarray(alpha / rank, jnp.float32)
    out[path + ("lora_dropout",)] = jnp.asarray(dropout, jnp.float32)
  return traverse_util.unflatten_dict(out)


def _adapter(module, params=None):
  """(a, b, scale, rate, seed, dropout) of a Linear's adapter: A and B in the module's compute dtype (fp32
  adapter weights are cast like the frozen kernel, as autocast does), fp32 scale and dropout rate, the mask's
  seed, and whether dropout is on (a dropout rng was passed). params: the Linear's own leaves when `module` is
  its parent (`adapted_matmuls`); the module's own otherwise."""
  get = (lambda name: params[name]) if params is not None else (lambda name: module.get_variable("params", name))
  a = get("lora_a").astype(module.dtype)
  b = get("lora_b").astype(module.dtype)
  scale = get("lora_scale").astype(jnp.float32)
  dropout = module.has_rng(DROPOUT_RNG)
  if dropout:
    rate = get("lora_dropout").astype(jnp.float32)
    seed = _seed(module.make_rng(DROPOUT_RNG))
  else:
    rate, seed = jnp.zeros((), jnp.float32), jnp.zeros((2,), jnp.uint32)
  return a, b, scale, rate, seed, dropout


def adapted_matmul(module, x, kernel):
  """x @ kernel + scale * B(A(dropout(x))) for a Linear whose params hold LoRA leaves (no bias), in the module's
  compute dtype."""
  a, b, scale, rate, seed, dropout = _adapter(module)
  lead = x.shape[:-1]
  (y,) = _lora_matmuls(x.reshape(-1, x.shape[-1]).astype(module.dtype), (kernel.astype(module.dtype),), (a,), (b,),
                       (scale,), (rate,), (seed,), dropout)
  return y.reshape(*lead, y.shape[-1])


def shares_input(module, names: Sequence[str]) -> bool:
  """Whether `module`'s child Linears `names` can run as one `adapted_matmuls` call: their params exist (not
  initialising) and each holds an adapter on a float kernel, without bias."""
  if module.is_initializing():
    return False
  params = module.variables.get("params", {})
  return all(name in params and "lora_a" in params[name] and "bias" not in params[name]
             and quantize.SCALE not in params[name] and np.ndim(params[name]["kernel"]) == 2 for name in names)


def adapted_matmuls(module, names: Sequence[str], x) -> tuple:
  """`adapted_matmul` of each of `module`'s child Linears `names` (see `shares_input`) on the same x, the adapters'
  products sharing one [x | h_1 | ... | h_n] operand: x is read for one concatenation instead of one per layer
  (self-attention's to_q, to_k and to_v), and the backward keeps that one array. Each adapter draws its own
  dropout mask, as peft's per-layer Dropout modules do. Returns the outputs in `names` order."""
  params = module.variables["params"]
  adapters = [_adapter(module, params[name]) for name in names]
  kernels = tuple(params[name]["kernel"].astype(module.dtype) for name in names)
  a, b, scale, rate, seed, dropout = zip(*adapters)
  lead = x.shape[:-1]
  ys = _lora_matmuls(x.reshape(-1, x.shape[-1]).astype(module.dtype), kernels, a, b, scale, rate, seed, dropout[0])
  return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)


# Why a custom VJP, and the adapter's product folded into the base matmul's contraction ([x | h] @ [W; B], h =
# scale * dropout(x) A, r extra columns): autodiff of W x + B A dropout(x) keeps dropout(x) (written and read back
# once more per adapted layer), writes B h at full width and adds it to W x in a separate pass, and does the same
# again in the backward. On the SD-2 UNet's b32 LoRA step those passes were 21 ms of 167 (H200 profile,
# BENCHMARKS.md). Here the forward writes [x | h] once and the base GEMM reads it; the backward takes [dx | dh] from
# one GEMM, and recomputes the dropout mask (a hash of the element index) instead of storing it. Several layers
# on the same x (`adapted_matmuls`) share the operand: [x | h_1 | ... | h_n] @ [W_i; 0; B_i; 0] for layer i.
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _lora_matmuls(x, kernels, a, b, scale, rate, seed, dropout: bool):
  return _lora_matmuls_fwd(x, kernels, a, b, scale, rate, seed, dropout)[0]


# Where the adapters' input side (the [x | h...] operand forward, dA backward) runs, with dropout on: "auto" =
# `pallas_lora`'s kernels on a Triton GPU for the shapes they take, XLA elsewhere; "xla" = always XLA; "interpret" =
# the kernels interpreted wherever they take the shapes (the tests, on the CPU). Read when a step is traced.
KERNELS = "auto"


def _use_kernels(x_shape, a, dropout: bool) -> bool:
  """The kernels (forward operand and dA) for shapes they take where the forward beats XLA's passes
  (`pallas_lora.FORWARD_MIN_ROWS`, `MAX_MEASURED_K`); interpreted wherever they take the shapes."""
  if not dropout or KERNELS == "xla":
    return False
  if KERNELS not in ("auto", "interpret"):
    raise ValueError(f"lora.KERNELS = {KERNELS!r}: expected 'auto', 'xla' or 'interpret'")
  from idmp_jax.models import attention, pallas_lora  # Local: Pallas only where it is used.
  shapes = {tuple(v.shape) for v in a}
  if len(shapes) != 1 or len({v.dtype for v in a}) != 1:
    return False
  (k, r), = shapes
  if not pallas_lora.supported(x_shape[0], k, r, len(a)):
    return False
  return KERNELS == "interpret" or (attention.pallas_by_default() and x_shape[0] >= pallas_lora.FORWARD_MIN_ROWS
                                    and k <= pallas_lora.MAX_MEASURED_K)


def _extended_kernel(kernels, b, i):
  """[W_i; 0; ...; B_i; ...; 0]: layer i's kernel over the shared operand [x | h_1 | ... | h_n]."""
  n_out = kernels[i].shape[1]
  rows = [b[j] if j == i else jnp.zeros((b[j].shape[0], n_out), b[j].dtype) for j in range(len(b))]
  return jnp.concatenate([kernels[i], *rows], axis=0)


def _lora_matmuls_fwd(x, kernels, a, b, scale, rate, seed, dropout):
  if _use_kernels(x.shape, a, dropout):
    from idmp_jax.models import pallas_lora
    xh = pallas_lora.down(x, jnp.stack(a), rate, seed, scale, interpret=KERNELS == "interpret")
  else:
    hs = [jnp.dot(_apply_dropout(x, rate[i], seed[i]) if dropout else x, a[i]) * scale[i].astype(x.dtype)
          for i in range(len(kernels))]
    xh = jnp.concatenate([x, *hs], axis=1)
  ys = tuple(jnp.dot(xh, _extended_kernel(kernels, b, i)) for i in range(len(kernels)))
  return ys, (xh, kernels, a, b, scale, rate, seed)


def _lora_matmuls_bwd(dropout, res, dys):
  xh, kernels, a, b, scale, rate, seed = res
  k = kernels[0].shape[0]
  x = xh[:, :k]
  # dA by the kernel only where the forward ran it: elsewhere XLA's forward has dropout(x) (its rank-16 GEMM's
  # operand), and XLA keeps it for dA (CSE of the same mask expression), cheaper than making the mask again.
  kernel_da = _use_kernels(x.shape, a, dropout)
  kernel_dx = False
  if kernel_da:
    from idmp_jax.models import pallas_lora
    kernel_dx = len(a) >= pallas_lora.UP_GRAD_MIN_ADAPTERS  # dx too, for adapters sharing x (q/k/v).
  dx, dkernels, da, db, dhs, dxhs, offset = None, [], [], [], [], [], k
  for i, dy in enumerate(dys):
    r = a[i].shape[1]
    dxh = jnp.dot(dy, jnp.concatenate([kernels[i], b[i]], axis=0).T)  # [dx_i | dh_i] from one GEMM.
    dxhs.append(dxh)
    h = xh[:, offset:offset + r]
    dh = dxh[:, k:] * scale[i].astype(dy.dtype)
    dhs.append(dh)
    db.append(jnp.dot(h.T, dy, preferred_element_type=jnp.float32).astype(b[i].dtype))
    # Dead when the kernel is frozen (XLA drops it).
    dkernels.append(jnp.dot(x.T, dy, preferred_element_type=jnp.float32).astype(kernels[i].dtype))
    offset += r
    if not kernel_da:
      xd = _apply_dropout(x, rate[i], seed[i]) if dropout else x
      da.append(jnp.dot(xd.T, dh, preferred_element_type=jnp.float32).astype(a[i].dtype))
    if kernel_dx:
      continue
    dxd = jnp.dot(dh, a[i].T)
    if dropout:
      dxd = _apply_dropout(dxd, rate[i], seed[i])  # The same mask and rescaling: dropout is linear in its input.
    dx_i = dxh[:, :k] + dxd
    dx = dx_i if dx is None else dx + dx_i
  if kernel_da:
    interpret = KERNELS == "interpret"
    da = pallas_lora.down_grad(xh, jnp.stack(dhs), rate, seed, k=k, interpret=interpret)
    da = [da[i].astype(a[i].dtype) for i in range(len(a))]
    if kernel_dx:
      dx = pallas_lora.up_grad(tuple(dxhs), jnp.stack(a), rate, seed, scale, k=k, interpret=interpret)
  dkernels, da, db = tuple(dkernels), tuple(da), tuple(db)
  zeros = lambda t: tuple(jnp.zeros_like(v) for v in t)
  return (dx, dkernels, da, db, zeros(scale), zeros(rate),
          tuple(np.zeros(s.shape, jax.dtypes.float0) for s in seed))


_lora_matmuls.defvjp(_lora_matmuls_fwd, _lora_matmuls_bwd)


def _lowbias32(h):
  """Chris Wellons' 32-bit integer hash (lowbias32): full avalanche in two multiply-xorshift rounds."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


GOLDEN = 0x9E3779B9  # 2^32 / phi: spreads consecutive pair indices before the hash.


def _seed(key):
  return jax.random.key_data(key).astype(jnp.uint32).reshape(-1)[jnp.array([0, -1])]


def mixed_seed(seed):
  """The mask's one 32-bit seed from the key's two words (s0 ^ hash(s1): keys differing in either word differ)."""
  seed = jnp.asarray(seed).astype(jnp.uint32)
  return seed[0] ^ _lowbias32(seed[1])


def keep_bits(pairs, seed):
  """(low, high) 16-bit halves of hash(pair index, mixed seed), as uint32: the bits of the two elements of each
  pair (`_apply_dropout`)."""
  h = _lowbias32(pairs * jnp.uint32(GOLDEN) ^ seed)
  return h & jnp.uint32(0xFFFF), h >> 16


def dropout_cut(rate):
  """(cut, factor): keep an element iff its 16 bits >= cut (uint32); kept elements are scaled by factor (fp32), the
  inverse of the keep probability actually used."""
  cut = jnp.round(jnp.asarray(rate, jnp.float32) * 65536.0)
  return cut.astype(jnp.uint32), 65536.0 / (65536.0 - cut)


def _apply_dropout(x, rate, seed):
  """Inverted dropout with a counter-based mask: 16 bits per element, one hash per two elements.

  Row i of x (leading axes flattened; K = last axis, H = ceil(K / 2)) draws hash(i * H + j, seed) for j < H; its low
  16 bits decide column j, its high 16 bits column j + H. Not jax.random.bits: threefry inlined in each of the SD-2
  UNet's 128 adapters made the XLA:CPU compile of the train step 25 s longer (tiny model) and costs ~100 integer ops
  per element on the GPU. One hash for two elements halves the integer work (what bounds a kernel that makes the
  mask in registers, `pallas_lora`), and pairing column j with j + H (not j + 1) gives such a kernel both halves of
  a tile from one hash tile, without interleaving. Like partitionable threefry the mask is a pure function of the
  global element index: it does not depend on how the batch is sharded (nor on the leading axes being flattened).
  keep iff bits >= round(rate * 2^16), rescaled by the keep probability actually used.
  """
  k = x.shape[-1]
  half = -(-k // 2)
  rows = x.size // max(k, 1)
  if rows * half >= 2**32:
    raise ValueError(f"LoRA dropout on {x.shape}: the counter-based mask needs < 2^32 element pairs")
  # Elementwise in (row, column), no concatenation of the two halves: XLA fuses it into the consumer as a loop.
  col = jax.lax.broadcasted_iota(jnp.uint32, (rows, k), 1)
  upper = col >= jnp.uint32(half)
  pairs = (jax.lax.broadcasted_iota(jnp.uint32, (rows, k), 0) * jnp.uint32(half)
           + jnp.where(upper, col - jnp.uint32(half), col))
  low, high = keep_bits(pairs, mixed_seed(seed))
  bits = jnp.where(upper, high, low).reshape(x.shape)
  cut, factor = dropout_cut(rate)
  return jnp.where(bits >= cut, x * factor.astype(x.dtype), jnp.zeros((), x.dtype))


def _dropout(x, rate, key):  # By a PRNG key, as Flax hands one out.
  return _apply_dropout(x, rate, _seed(key))


def apply_adapter(module, x):
  """scale * B(A(dropout(x))) alone: the adapter of a Linear whose base kernel is quantised (int8/int4 weights
  are multiplied by `quantize.matmul`, so they cannot join the adapter's contraction)."""
  a, b, scale, rate, seed, dropout = _adapter(module)
  x = x.astype(module.dtype)
  if dropout:
    x = _apply_dropout(x, rate, seed)
  return jnp.dot(jnp.dot(x, a), b) * scale.astype(module.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Tree surgery.


def is_trainable(path: tuple) -> bool:
  return path[-1] in TRAINABLE_LEAVES


def is_lora(path: tuple) -> bool:
  return path[-1] in LORA_LEAVES


def trainable_mask(params) -> dict:
  """A tree of bools shaped like `params`: True at lora_a/lora_b (e.g. for optax.masked)."""
  return traverse_util.unflatten_dict({p: is_trainable(p) for p in _flat(params)})


def split(params, predicate: Callable[[tuple], bool] = is_trainable) -> tuple[dict, dict]:
  """(selected, rest): two disjoint nested dicts of the leaves whose path satisfies `predicate` and the others.
  Default: (trainable LoRA weights, everything frozen)."""
  flat = _flat(params)
  chosen = {p: v for p, v in flat.items() if predicate(p)}
  rest = {p: v for p, v in flat.items() if not predicate(p)}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge(*trees) -> dict:
  """Inverse of `split`: the union of disjoint nested dicts (a leaf in two trees is an error)."""
  out = {}
  for tree in trees:
    for path, value in _flat(tree).items():
      if path in out:
        raise ValueError(f"merge: leaf {'/'.join(path)} is in more than one tree")
      out[path] = value
  return traverse_util.unflatten_dict(out)


def _delta(a, b, scale):
  # fp32 at full precision: the fold must not depend on the default matmul precision (TF32/bf16 on GPU).
  return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale


def merge_lora(params) -> dict:
  """Folds every adapter into its kernel (W' = W + scale * A B, in fp32) and drops the LoRA leaves: a plain
  base-model tree that gives the adapted model's (dropout-free) output."""
  adapters, base = split(params, is_lora)
  flat = _flat(base)
  for path, leaves in _modules(adapters).items():
    kernel = flat[path + ("kernel",)]
    if jnp.issubdtype(kernel.dtype, jnp.integer):
      raise ValueError(f"merge_lora: {'/'.join(path)} has a quantised kernel; merge into the float base instead")
    flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + _delta(
        leaves["lora_a"], leaves["lora_b"], leaves["lora_scale"])).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def unmerge_lora(merged, adapters) -> dict:
  """Inverse of `merge_lora` given the adapter leaves (`split(params, is_lora)[0]`): W = W' - scale * A B,
  with the adapters put back. Exact up to fp32 rounding of the add/subtract."""
  flat = _flat(merged)
  for path, leaves in _modules(adapters).items():
    kernel = flat[path + ("kernel",)]
    flat[path + ("kernel",)] = (kernel.astype(jnp.float32) - _delta(
        leaves["lora_a"], leaves["lora_b"], leaves["lora_scale"])).astype(kernel.dtype)
  return merge(traverse_util.unflatten_dict(flat), adapters)


def _modules(adapters) -> dict[tuple, dict]:
  """{module path: {leaf name: value}} of a tree of LoRA leaves."""
  out: dict[tuple, dict] = {}
  for path, value in _flat(adapters).items():
    out.setdefault(path[:-1], {})[path[-1]] = value
  return out


def count(params) -> int:
  """Number of trainable LoRA weights."""
  return sum(int(np.prod(np.shape(v))) for p, v in _flat(params).items() if is_trainable(p))


# ----------------------------------------------------------------------------------------------------------------
# diffusers / peft files.


def _module_key(path: tuple, list_names: Iterable[str]) -> str:
  """Flax module path -> the PyTorch module name (`.../to_out_0` -> `....to_out.0`)."""
  return torch_format.torch_key(tuple(path) + ("weight",), list_names)[:-len(".weight")]


def save_diffusers_lora(folder: str, params, list_names: Iterable[str], *, prefix: str = "unet",
                        key_style: str = "diffusers") -> str:
  """Writes `folder/pytorch_lora_weights.safetensors`, the file `pipe.load_lora_weights(folder)` reads.

  key_style "diffusers" (what the original's training script writes, via diffusers'
  `convert_state_dict_to_diffusers`): `unet.<module>.lora.down.weight` (r, in) and `.lora.up.weight` (out, r);
  "peft": `.lora_A.weight` / `.lora_B.weight`. The safetensors metadata carries the peft LoraConfig under
  diffusers' `lora_adapter_metadata` key (r, lora_alpha, target_modules), so diffusers >= 0.34 restores alpha;
  older diffusers (the original pins 0.29.2) assume alpha = r, which the paper's recipe (r = alpha = 16) meets.
  Weights are written fp32. Returns the file's path.
  """
  if key_style not in ("diffusers", "peft"):
    raise ValueError(f"key_style must be 'diffusers' or 'peft', got {key_style!r}")
  down, up = ("lora.down", "lora.up") if key_style == "diffusers" else ("lora_A", "lora_B")
  modules = _modules(split(jax.device_get(params), is_lora)[0])
  if not modules:
    raise ValueError("no LoRA leaves in the param tree")
  state, ranks, alphas, dropouts = {}, set(), set(), set()
  for path, leaves in modules.items():
    name = f"{prefix}.{_module_key(path, list_names)}" if prefix else _module_key(path, list_names)
    a, b = np.asarray(leaves["lora_a"], np.float32), np.asarray(leaves["lora_b"], np.float32)
    state[f"{name}.{down}.weight"] = np.ascontiguousarray(a.T)
    state[f"{name}.{up}.weight"] = np.ascontiguousarray(b.T)
    rank = a.shape[1]
    ranks.add(rank)
    alphas.add(float(np.asarray(leaves["lora_scale"])) * rank)
    dropouts.add(float(np.asarray(leaves["lora_dropout"])))
  if len(ranks) != 1 or len(alphas) != 1:
    raise ValueError(f"one rank and alpha for all layers expected, got ranks {ranks}, alphas {alphas}")
  alpha = alphas.pop()
  config = {"r": ranks.pop(), "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": max(dropouts), "target_modules": sorted(_module_key(p, list_names) for p in modules),
            "init_lora_weights": "gaussian", "use_dora": False, "lora_bias": False}
  packed = {f"{prefix}.{k}" if prefix else k: v for k, v in config.items()}
  metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
  path = os.path.join(folder, WEIGHT_NAME)
  torch_format.save_state_dict(state, path, metadata=metadata)
  return path


def load_diffusers_lora(path: str, params, list_names: Iterable[str], *, prefix: str = "unet",
                        alpha: float | None = None, dropout: float = 0.0) -> dict:
  """Reads a LoRA file (diffusers `lora.down/up` or peft `lora_A/B` keys, optionally `prefix.`-qualified) into
  `params` (a base tree without LoRA leaves), as `init_lora` would lay it out. alpha: from the file's metadata,
  else the argument, else r (what diffusers assumes). Every adapter must land on a Linear of the tree."""
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  state = torch_format.load_state_dict([path])
  from safetensors import safe_open
  with safe_open(path, "np") as f:
    meta = (f.metadata() or {}).get(METADATA_KEY)
  meta = {k.split(".", 1)[1] if prefix and k.startswith(prefix + ".") else k: v
          for k, v in (json.loads(meta) if meta else {}).items()}
  rename = lambda key: key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
  return _attach(state, params, list_names, rename, lambda rank: meta.get("lora_alpha", alpha if alpha is not None
                                                                          else rank), dropout, path)


def _attach(state: dict, params, list_names: Iterable[str], rename: Callable[[str], str],
            alpha_for: Callable[[int], float], dropout: float, source: str) -> dict:
  """`params` (no LoRA leaves) with the adapters of a state dict (lora.down/up or lora_A/B keys) attached as
  `init_lora` lays them out. `rename` maps a tensor key (less its LoRA suffix) to the module's PyTorch name in
  the tree's own layout; `alpha_for(rank)` gives alpha. Every adapter must land on a Linear of the tree, with
  shapes that fit; problems are listed with `source`."""
  flat = _flat(params)
  by_key = {_module_key(p[:-1], list_names): p[:-1] for p in flat if p[-1] == "kernel" and np.ndim(flat[p]) == 2}
  out, problems = dict(flat), []
  names = {}
  for key, value in state.items():
    for tag, leaf in ((".lora.down.weight", "lora_a"), (".lora.up.weight", "lora_b"),
                      (".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
      if key.endswith(tag):
        names.setdefault(rename(key[:-len(tag)]), {})[leaf] = np.asarray(value, np.float32).T
        break
    else:
      problems.append(f"tensor {key!r} is not a LoRA weight")
  for module, leaves in sorted(names.items()):
    if module not in by_key:
      problems.append(f"{module}: no Linear of the model has this name")
      continue
    if set(leaves) != {"lora_a", "lora_b"}:
      problems.append(f"{module}: needs both down/A and up/B weights, found {sorted(leaves)}")
      continue
    mpath = by_key[module]
    rank = leaves["lora_a"].shape[1]
    fan_in, fan_out = np.shape(flat[mpath + ("kernel",)])
    if leaves["lora_a"].shape != (fan_in, rank) or leaves["lora_b"].shape != (rank, fan_out):
      problems.append(f"{module}: LoRA shapes {leaves['lora_a'].shape}/{leaves['lora_b'].shape} do not fit the "
                      f"kernel ({fan_in}, {fan_out})")
      continue
    out[mpath + ("lora_a",)], out[mpath + ("lora_b",)] = leaves["lora_a"], leaves["lora_b"]
    out[mpath + ("lora_scale",)] = np.asarray(alpha_for(rank) / rank, np.float32)
    out[mpath + ("lora_dropout",)] = np.asarray(dropout, np.float32)
  if not names and not problems:
    problems.append("no LoRA weights in the file")
  if problems:
    raise torch_format.CheckpointError(f"{source}: " + "; ".join(problems[:10]))
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------------------------
# peft adapter folders (adapter_config.json + adapter_model.safetensors), as `PeftModel.save_pretrained` writes
# them and `PeftModel.from_pretrained` reads them.

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's LoraModel wraps the model: its keys start here.


def save_peft_adapter(folder: str, params, list_names: Iterable[str], *, target_modules: str | Sequence[str],
                      base_model_name_or_path: str = "", init: str = "gaussian") -> str:
  """Writes a peft LoRA folder from a tree holding LoRA leaves (any others are ignored): weights fp32 under
  `base_model.model.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), <module> the tree's PyTorch
  module name; adapter_config.json with r, lora_alpha, lora_dropout and `target_modules` (a list of module name
  suffixes, or a regex string that peft matches against full module names). Returns the folder."""
  modules = _modules(split(jax.device_get(params), is_lora)[0])
  if not modules:
    raise ValueError("no LoRA leaves in the param tree")
  state, ranks, alphas, dropouts = {}, set(), set(), set()
  for path, leaves in modules.items():
    name = PEFT_PREFIX + _module_key(path, list_names)
    a, b = np.asarray(leaves["lora_a"], np.float32), np.asarray(leaves["lora_b"], np.float32)
    state[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    state[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    ranks.add(a.shape[1])
    alphas.add(float(np.asarray(leaves["lora_scale"])) * a.shape[1])
    dropouts.add(float(np.asarray(leaves["lora_dropout"])))
  if len(ranks) != 1 or len(alphas) != 1 or len(dropouts) != 1:
    raise ValueError(f"one rank, alpha and dropout for all layers expected, got ranks {ranks}, alphas {alphas}, "
                     f"dropouts {dropouts}")
  alpha = alphas.pop()
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path or None,
      "r": ranks.pop(), "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": dropouts.pop(),
      "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
      "init_lora_weights": init, "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
      "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
      "layers_pattern": None, "inference_mode": True, "revision": None,
  }
  os.makedirs(folder, exist_ok=True)
  torch_format.save_state_dict(state, os.path.join(folder, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
  torch_format.write_json(config, os.path.join(folder, PEFT_CONFIG_NAME))
  return folder


def load_peft_adapter(folder: str, params, list_names: Iterable[str], *,
                      rename: Callable[[str], str] = lambda key: key, dropout: float | None = None) -> dict:
  """A peft LoRA folder attached to `params` (a base tree without LoRA leaves), as `init_lora` lays it out.
  `rename` maps peft's module names (less `base_model.model.`) to the tree's layout (e.g. LLaVA-NeXT's
  transformers 4.x / 5.x module paths to the hub's). Options that change the adapter's arithmetic beyond
  scale * B A (DoRA, rsLoRA, per-layer rank/alpha patterns, bias, modules_to_save) are refused by name.
  dropout: the config's lora_dropout unless given (it only acts when a dropout rng is passed)."""
  config_path, weights_path = os.path.join(folder, PEFT_CONFIG_NAME), os.path.join(folder, PEFT_WEIGHTS_NAME)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: missing from the peft adapter folder")
  config = torch_format.read_json(config_path)
  problems = []
  if config.get("peft_type", "LORA") != "LORA":
    problems.append(f"peft_type {config.get('peft_type')!r} is not 'LORA'")
  for key in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
              "layers_to_transform", "trainable_token_indices"):
    if config.get(key):
      problems.append(f"{key} = {config[key]!r} is not supported")
  if config.get("bias", "none") != "none" or config.get("lora_bias"):
    problems.append(f"bias = {config.get('bias')!r} / lora_bias = {config.get('lora_bias')!r}: only 'none'/false")
  if not isinstance(config.get("r"), int) or "lora_alpha" not in config:
    problems.append("needs integer 'r' and 'lora_alpha'")
  if problems:
    raise torch_format.CheckpointError(f"{config_path}: " + "; ".join(problems))
  state = torch_format.load_state_dict([weights_path])
  alpha = float(config["lora_alpha"])

  def module_name(key):
    return rename(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)

  rate = float(config.get("lora_dropout", 0.0)) if dropout is None else dropout
  return _attach(state, params, list_names, module_name, lambda rank: alpha, rate, weights_path)
