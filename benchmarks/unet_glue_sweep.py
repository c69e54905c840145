"""The SD-2 UNet's memory-bound glue at its own shapes: GroupNorm(+SiLU), LayerNorm and GEGLU, time per call,
forward and forward + backward (the input's gradient only: the UNet's norms are frozen), beside a copy of the
same bytes, and optionally beside another version of `idmp_jax/models/layers.py` (an A/B without a second
checkout of the package). Issue 5: in the b32 LoRA step's profile the norms cost ~20 ms a step and GEGLU ~9 ms,
2-3x their bytes' floor (BENCHMARKS.md).

  python benchmarks/unet_glue_sweep.py                             # b32, 512 px, on the GPU
  python benchmarks/unet_glue_sweep.py --compare OLD/idmp_jax/models/layers.py --profile /tmp/glue_prof
  python benchmarks/unet_glue_sweep.py --small                     # CPU smoke test

The calls (class, input shape, groups, eps, SiLU; GEGLU's projection width) are read off the UNet itself (its
forward traced abstractly, the modules' calls intercepted), so the list and each shape's count per forward are
the model's. GEGLU is timed from its projection's output h (B, S, 2n); a layers.py without `geglu` (older ones)
gets autodiff of diffusers' formula. "passes": the call's time in units of one read (or one write) of its input
at the copy's bandwidth. Floors: a GroupNorm forward >= 3 (statistics, then read and write), forward + backward
>= 8 (+ read x and dy for the backward's sums, read them again, write dx); LayerNorm 2 and 5 when a row stays
on chip; GEGLU 1.5 and 4. Every call is a jit over --buffers distinct inputs.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402
from benchmarks.profile_summary import profile_steps  # noqa: E402
from benchmarks.train_step import REGIONS, SD2_UNET, SMALL_UNET  # noqa: E402
from idmp_jax.models import layers, unet  # noqa: E402


def glue_calls(ucfg, batch: int, dtype) -> collections.Counter:
  """Counter of (kind, shape, num_groups, eps, activation, use_scale, use_bias) over one forward; shape is the
  norm's input or GEGLU's projection output."""
  calls = collections.Counter()

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      shape = tuple(args[0].shape)
      if isinstance(m, layers.GroupNorm):
        calls[("GroupNorm", shape, m.num_groups, m.epsilon, m.activation, True, True)] += 1
      elif isinstance(m, layers.LayerNorm):
        calls[("LayerNorm", shape, 0, m.epsilon, None, m.use_scale, m.use_bias)] += 1
      elif isinstance(m, unet._GEGLU):
        calls[("GEGLU", shape[:-1] + (2 * m.inner,), 0, 0.0, None, False, False)] += 1
    return next_fun(*args, **kwargs)

  model = unet.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl="xla")
  s = ucfg.sample_size
  spec = jax.ShapeDtypeStruct
  params = unet.abstract_params(ucfg)  # (Outside the interception: it traces an init at batch 1.)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a[:3], region_masks=a[3], token_region=a[4]),
                   params, spec((batch, s, s, ucfg.in_channels), dtype), spec((batch,), jnp.int32),
                   spec((batch, 77, ucfg.cross_attention_dim), dtype), spec((batch, REGIONS, s, s), jnp.uint8),
                   spec((batch, 77), jnp.int32))
  return calls


def _plain_geglu(h):
  value, gate = jnp.split(h, 2, axis=-1)
  return value * jax.nn.gelu(gate, approximate=False)


def make_fn(lib, key, dtype, params):
  """x -> the op as `lib` (a layers module) computes it."""
  kind, _, groups, eps, act, use_scale, use_bias = key
  if kind == "GEGLU":
    return getattr(lib, "geglu", _plain_geglu)
  if kind == "GroupNorm":
    mod = lib.GroupNorm(groups, eps, dtype=dtype, activation=act)
  else:
    mod = lib.LayerNorm(eps, use_bias=use_bias, use_scale=use_scale, dtype=dtype)
    params = {k: v for k, v, on in zip(("scale", "bias"), params.values(), (use_scale, use_bias)) if on}
  return lambda x: mod.apply({"params": params}, x)


def load_layers(path: str, i: int = 0):
  spec = importlib.util.spec_from_file_location(f"compare_layers{i}", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # Flax's dataclass transform looks the module up by name.
  spec.loader.exec_module(mod)
  return mod


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--compare", nargs="*", default=[], help="other layers.py files to time beside this checkout's")
  p.add_argument("--hlo", default="", help="write each variant's optimized HLO (forward + backward, the largest "
                 "shape of each op) into this folder")
  p.add_argument("--profile", default="", help="profile the largest GroupNorm+SiLU's and GEGLU's forward + "
                 "backward per variant into this folder and list their kernels")
  p.add_argument("--small", action="store_true", help="tiny UNet, batch 2 (CPU smoke test)")
  args = p.parse_args(argv)
  dtype = jnp.bfloat16
  ucfg = unet.UNetConfig.from_dict(dict(SMALL_UNET if args.small else SD2_UNET), source="unet_glue_sweep")
  batch = 2 if args.small else args.batch
  n, iters = (1, 2) if args.small else (args.buffers, args.iters)
  calls = glue_calls(ucfg, batch, dtype)
  variants = {"this": layers}
  for i, path in enumerate(args.compare):
    variants[f"compare{i}" if len(args.compare) > 1 else "compare"] = load_layers(path, i)
  print(f"devices: {jax.devices()}; batch {batch}; {sum(calls.values())} calls a forward, {len(calls)} "
        f"distinct; variants: " + ", ".join(f"{k} = {v.__file__}" for k, v in variants.items()), flush=True)
  rng = np.random.default_rng(0)
  totals = collections.Counter()
  header = f"{'op':10} {'shape':22} {'act':5} {'x':>3} {'MB':>6} {'copy us':>8}"
  for v in variants:
    header += f" | {v + ' fwd us':>14} {'passes':>6} {'f+b us':>8} {'passes':>6}"
  print(header)
  profiled, hlo_done = {}, {}
  for i, (key, count) in enumerate(sorted(calls.items(), key=lambda kv: -np.prod(kv[0][1]) * kv[1])):
    kind, shape = key[0], key[1]
    c = shape[-1]
    out_shape = shape[:-1] + (c // 2,) if kind == "GEGLU" else shape
    keys = jax.random.split(jax.random.key(i), 2 * n + 1)  # On the device: NumPy takes minutes here.
    offset = jax.random.normal(keys[-1], (c,))
    xs = [(jax.random.normal(k, shape) + offset).astype(dtype) for k in keys[:n]]
    gs = [jax.random.normal(k, out_shape, dtype) for k in keys[n:2 * n]]
    params = {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(c), jnp.float32),
              "bias": jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)}
    copy_us = timed(jax.jit(lambda xs: [x * jnp.asarray(1.5, x.dtype) for x in xs]), (xs,), n, iters)
    pass_us = copy_us / 2  # One read or one write of x at the copy's bandwidth.
    row = f"{kind:10} {str(shape):22} {str(key[4]):5} {count:>3} {np.prod(shape) * 2 / 1e6:6.1f} {copy_us:8.1f}"
    for v, lib in variants.items():
      f = make_fn(lib, key, dtype, params)
      fwd = jax.jit(lambda xs, f=f: [f(x) for x in xs])
      both = jax.jit(lambda xs, gs, f=f: [jax.vjp(f, x)[1](g)[0] for x, g in zip(xs, gs)])
      fwd_us, both_us = timed(fwd, (xs,), n, iters), timed(both, (xs, gs), n, iters)
      totals[(v, kind, "fwd")] += count * fwd_us
      totals[(v, kind, "f+b")] += count * both_us
      row += f" | {fwd_us:14.1f} {fwd_us / pass_us:6.1f} {both_us:8.1f} {both_us / pass_us:6.1f}"
      if args.hlo and hlo_done.setdefault((kind, v), key) == key:
        os.makedirs(args.hlo, exist_ok=True)
        for what, fn, a in (("fwd", fwd, (xs[:1],)), ("fwd_bwd", both, (xs[:1], gs[:1]))):
          with open(os.path.join(args.hlo, f"{kind}_{v}_{what}.txt"), "w") as f:
            f.write(fn.lower(*a).compile().as_text())
      if args.profile and (kind == "GEGLU" or key[4] == "silu") and profiled.setdefault(kind, key) == key:
        print(f"\nprofile: {v}, {key}, forward + backward", flush=True)
        profile_steps(lambda: jax.block_until_ready(both(xs, gs)), 3, os.path.join(args.profile, kind, v), top=12)
    print(row, flush=True)
  print("\nper forward of the UNet (sum over its calls), ms:")
  for v in variants:
    for kind in ("GroupNorm", "LayerNorm", "GEGLU"):
      fwd, fb = totals[(v, kind, "fwd")] / 1e3, totals[(v, kind, "f+b")] / 1e3
      print(f"  {v:8s} {kind:10s} forward {fwd:7.2f}   forward + backward {fb:7.2f}   (backward ~{fb - fwd:.2f})")


if __name__ == "__main__":
  main()
