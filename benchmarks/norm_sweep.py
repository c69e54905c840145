"""GroupNorm(+SiLU) and LayerNorm at the SD-2 UNet's own shapes: time per call, forward and forward + backward
(dx only: the UNet's norms are frozen), beside a copy of the same bytes, and optionally beside another version
of `idmp_jax/models/layers.py` (an A/B of the norms without a second checkout of the package). Issue 5: the
b32 LoRA step's norms cost ~20 ms a step in the profile (BENCHMARKS.md), about 2.5x their bytes' floor.

  python benchmarks/norm_sweep.py                                  # b32, 512 px, on the GPU
  python benchmarks/norm_sweep.py --compare OLD/idmp_jax/models/layers.py --profile /tmp/norm_prof
  python benchmarks/norm_sweep.py --small                          # CPU smoke test

The norm calls (class, input shape, groups, eps, SiLU) are read off the UNet itself (its forward traced
abstractly, the norms' calls intercepted), so the list and each shape's count per forward are the model's.
"passes": the call's time in units of one read (or one write) of its input at the copy's bandwidth; a GroupNorm
forward needs >= 3 (statistics, then read and write), forward + backward >= 8 (+ read x and dy for the
backward's sums, read them again and write dx). Every call is a jit over --buffers distinct inputs.
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


def norm_calls(ucfg, batch: int, dtype) -> collections.Counter:
  """Counter of (class name, input shape, num_groups, eps, activation, use_scale, use_bias) over one forward."""
  calls = collections.Counter()

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (layers.GroupNorm, layers.LayerNorm)):
      gn = isinstance(m, layers.GroupNorm)
      calls[(type(m).__name__, tuple(args[0].shape), m.num_groups if gn else 0, m.epsilon,
             m.activation if gn else None, True if gn else m.use_scale, True if gn else m.use_bias)] += 1
    return next_fun(*args, **kwargs)

  model = unet.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl="xla")
  s = ucfg.sample_size
  spec = jax.ShapeDtypeStruct
  params = unet.abstract_params(ucfg)  # (Outside the interception: it traces an init at batch 1.)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a[:3], region_masks=a[3], token_region=a[4]),
                   params, spec((batch, s, s, ucfg.in_channels), dtype),
                   spec((batch,), jnp.int32), spec((batch, 77, ucfg.cross_attention_dim), dtype),
                   spec((batch, REGIONS, s, s), jnp.uint8), spec((batch, 77), jnp.int32))
  return calls


def make_module(lib, key, dtype):
  name, _, groups, eps, act, use_scale, use_bias = key
  if name == "GroupNorm":
    return lib.GroupNorm(groups, eps, dtype=dtype, activation=act)
  return lib.LayerNorm(eps, use_bias=use_bias, use_scale=use_scale, dtype=dtype)


def load_layers(path: str):
  spec = importlib.util.spec_from_file_location("compare_layers", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # Flax's dataclass transform looks the module up by name.
  spec.loader.exec_module(mod)
  return mod


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--compare", default="", help="another layers.py to time beside this checkout's")
  p.add_argument("--profile", default="", help="profile the largest GroupNorm+SiLU's forward + backward per "
                 "variant into this folder and list its kernels")
  p.add_argument("--small", action="store_true", help="tiny UNet, batch 2 (CPU smoke test)")
  args = p.parse_args(argv)
  dtype = jnp.bfloat16
  ucfg = unet.UNetConfig.from_dict(dict(SMALL_UNET if args.small else SD2_UNET), source="norm_sweep")
  batch = 2 if args.small else args.batch
  n, iters = (1, 2) if args.small else (args.buffers, args.iters)
  calls = norm_calls(ucfg, batch, dtype)
  variants = {"this": layers}
  if args.compare:
    variants["compare"] = load_layers(args.compare)
  print(f"devices: {jax.devices()}; batch {batch}; {sum(calls.values())} norm calls a forward, {len(calls)} "
        f"distinct; variants: " + ", ".join(f"{k} = {v.__file__}" for k, v in variants.items()), flush=True)
  rng = np.random.default_rng(0)
  totals = collections.Counter()
  header = f"{'norm':10} {'shape':22} {'act':5} {'x':>3} {'MB':>6} {'copy us':>8}"
  for v in variants:
    header += f" | {v + ' fwd us':>14} {'passes':>6} {'f+b us':>8} {'passes':>6}"
  print(header)
  largest_gn = None
  for key, count in sorted(calls.items(), key=lambda kv: -np.prod(kv[0][1]) * kv[1]):
    shape, c = key[1], key[1][-1]
    xs = [jnp.asarray(rng.standard_normal(shape) + rng.standard_normal(c), dtype) for _ in range(n)]
    gs = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(n)]
    params = {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(c), jnp.float32),
              "bias": jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)}
    if key[0] == "LayerNorm":
      params = {k: v for k, v, on in zip(("scale", "bias"), params.values(), key[5:]) if on}
    nbytes = np.prod(shape) * 2
    copy_us = timed(jax.jit(lambda xs: [x * jnp.asarray(1.5, x.dtype) for x in xs]), (xs,), n, iters)
    pass_us = copy_us / 2  # One read or one write of x at the copy's bandwidth.
    row = f"{key[0]:10} {str(shape):22} {str(key[4]):5} {count:>3} {nbytes / 1e6:6.1f} {copy_us:8.1f}"
    for v, lib in variants.items():
      mod = make_module(lib, key, dtype)
      f = lambda x, mod=mod: mod.apply({"params": params}, x)
      fwd = jax.jit(lambda xs, f=f: [f(x) for x in xs])
      both = jax.jit(lambda xs, gs, f=f: [jax.vjp(f, x)[1](g)[0] for x, g in zip(xs, gs)])
      fwd_us, both_us = timed(fwd, (xs,), n, iters), timed(both, (xs, gs), n, iters)
      totals[(v, "fwd")] += count * fwd_us
      totals[(v, "f+b")] += count * both_us
      row += f" | {fwd_us:14.1f} {fwd_us / pass_us:6.1f} {both_us:8.1f} {both_us / pass_us:6.1f}"
      if args.profile and key[0] == "GroupNorm" and key[4] == "silu" and (largest_gn in (None, key)):
        largest_gn = key
        print(f"\nprofile: {v}, {key}, forward + backward", flush=True)
        profile_steps(lambda: jax.block_until_ready(both(xs, gs)), 3, os.path.join(args.profile, v), top=12)
    print(row, flush=True)
  print("\nper forward of the UNet (sum over its norm calls), ms:")
  for v in variants:
    fwd, fb = totals[(v, "fwd")] / 1e3, totals[(v, "f+b")] / 1e3
    print(f"  {v:8s} forward {fwd:7.2f}   forward + backward {fb:7.2f}   (backward alone ~{fb - fwd:.2f})")


if __name__ == "__main__":
  main()
