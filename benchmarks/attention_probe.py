"""The SD-2 UNet's attention calls at b32, 512 px, alone: cuDNN flash attention forward and forward + backward per
shape, in TFLOP/s, in the layout the UNet feeds it (BTNH) and heads-major (BNTH), and the RCA cross-attention with
and without its mask. Issue 5: attention is ~23% of the LoRA step; is it at cuDNN's rate, and does the layout or
RCA's mask cost anything?

  python benchmarks/attention_probe.py            # on the GPU
  python benchmarks/attention_probe.py --small    # CPU smoke test (XLA attention, tiny shapes)
  python benchmarks/attention_probe.py --pallas-configs 64,0,4,2,64,0,8,2 128,0,8,2,128,0,8,2

The shapes with at most 128 keys (the cross-attention; also the last level's self-attention) are also timed on
`pallas_cross_attention.cross_attention` (Pallas kernels for few keys; interpreted under --small), once per
--pallas-configs tuple (its DEFAULT_CONFIG layout: fwd block_t, splits, num_warps, num_stages, then the
backward's), each checked against XLA's output first. Its memory floor at b32, T=4096, 5 heads, bf16: ~181 MB
forward (q, o, the bool mask, k, v: ~38 us at 4.8 TB/s), ~265 MB backward (q, dO, dQ, mask, k, v) plus 12.8 MB
of fp32 dK/dV partials per backward split, written and read back.

FLOPs: forward 4·B·N·T·S·H, backward 2.5x that (dQ, dK, dV and the recomputed logits). Each call is a jit over
--buffers distinct inputs so the time is the kernels', not the dispatch's.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402
from idmp_jax.models import pallas_cross_attention  # noqa: E402

# (tokens, heads) of the UNet's four levels at 512 px; head dim 64; 77 text tokens (padded to 78 with a mask).
LEVELS = ((4096, 5), (1024, 10), (256, 20), (64, 20))
# The Pallas cross-attention tilings swept: the default, larger and smaller query tiles, four backward splits.
PALLAS_CONFIGS = (pallas_cross_attention.DEFAULT_CONFIG, (128, 0, 8, 2, 128, 0, 8, 2), (32, 0, 4, 3, 32, 0, 4, 3),
                  (64, 0, 8, 3, 64, 4, 4, 3))


def attention(impl: str, layout: str, config=None, interpret: bool = False):
  def fn(q, k, v, mask):
    if impl == "xla":
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if impl == "pallas":
      return pallas_cross_attention.cross_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5, config=config,
                                                    interpret=interpret)
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    return cudnn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, qkv_layout=layout)
  return fn


def probe(b, t, s, n, h, layout, masked, impl, buffers, iters, rng, config=None, interpret=False):
  shape = lambda length: (b, n, length, h) if layout == "BNTH" else (b, length, n, h)
  make = lambda length: jnp.asarray(rng.standard_normal(shape(length)), jnp.bfloat16)
  inputs = [(make(t), make(s), make(s)) for _ in range(buffers)]
  mask = None
  if masked:
    mask = jnp.asarray(rng.uniform(size=(b, 1, t, s)) > 0.3)
    mask = mask.at[..., 0].set(True)  # Every query sees a token (BOS is region 0 in RCA).
  fn = attention(impl, layout, config, interpret)
  fwd = jax.jit(lambda xs: [fn(q, k, v, mask) for q, k, v in xs])
  if impl == "pallas":  # Checked against XLA's attention before it is timed.
    q, k, v = inputs[0]
    ref = np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"), np.float32)
    err = float(np.linalg.norm(np.asarray(fn(q, k, v, mask), np.float32) - ref) / np.linalg.norm(ref))
    if not err < 2e-2:
      raise AssertionError(f"wrong: relative error {err:.2e} against XLA")

  def fwd_bwd(xs):
    outs = []
    for q, k, v in xs:
      o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
      outs.append(vjp(o))
    return outs
  flops = 4 * b * n * t * s * h
  us_f = timed(fwd, (inputs,), buffers, iters)
  us_fb = timed(jax.jit(fwd_bwd), (inputs,), buffers, iters)
  return us_f, us_fb, flops / us_f / 1e6, 3.5 * flops / us_fb / 1e6


def config_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(","))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--only", choices=["all", "cross"], default="all",
                 help="cross: only the few-key calls (the cross-attention with and without its mask; no self rows)")
  p.add_argument("--pallas-configs", type=config_tuple, nargs="*", default=list(PALLAS_CONFIGS),
                 help="Pallas cross-attention configs to time, each as comma-separated ints (none: no Pallas rows)")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  impl = "xla" if args.small else "cudnn"
  levels = ((64, 2), (16, 4)) if args.small else LEVELS
  b = 2 if args.small else args.batch
  print(f"{'call':28s} {'layout':6s} {'fwd us':>9s} {'fwd+bwd us':>11s} {'fwd TF/s':>9s} {'f+b TF/s':>9s}  kernel")

  def row(label, layout, kernel, *probe_args, **probe_kw):
    try:
      f, fb, tf, tfb = probe(*probe_args, **probe_kw)
      print(f"{label:28s} {layout:6s} {f:9.1f} {fb:11.1f} {tf:9.1f} {tfb:9.1f}  {kernel}", flush=True)
    except Exception as e:  # A layout cuDNN refuses, a tiling Triton does not compile: say so and go on.
      print(f"{label:28s} {layout:6s} failed: {type(e).__name__}: {str(e)[:150]}  {kernel}", flush=True)

  for t, n in levels:
    calls = (("self", t, False), ("cross 78, RCA mask", 78, True), ("cross 78, no mask", 78, False))
    for name, s, masked in calls[1:] if args.only == "cross" else calls:
      label = name + f" T={t} N={n}"
      for layout in ("BTNH",) if args.small else ("BTNH", "BNTH"):  # jax.nn's XLA path is BTNH only.
        if masked and layout == "BNTH":
          continue
        row(label, layout, impl, b, t, s, n, 64, layout, masked, impl, args.buffers, args.iters, rng)
      if s <= pallas_cross_attention.MAX_KEYS:
        for config in args.pallas_configs:
          row(label, "BTNH", "pallas " + ",".join(map(str, config)), b, t, s, n, 64, "BTNH", masked, "pallas",
              args.buffers, args.iters, rng, config=config, interpret=args.small)


if __name__ == "__main__":
  main()
