"""The transformer blocks' residual add + LayerNorm on the SD-2 UNet's shapes at b32, 512 px: XLA's path against
`pallas_norm`'s kernels, alone (issue 5). Per shape (rows, C):

  forward   (x, delta) -> (h = x + delta, y = LayerNorm(h)) and without the add (x -> y)
  backward  (h, dy, dh) -> dh + LN'(h)^T dy

  python benchmarks/norm_kernels_probe.py            # on the GPU
  python benchmarks/norm_kernels_probe.py --small    # CPU smoke test (kernels interpreted, tiny shapes)

Each row gives the bytes the pass must move at least (its inputs read and outputs written once) as GB/s of the time.
Each timing is a jit over --buffers distinct inputs, so the time is the kernels', not the dispatch's.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402
# (rows, C) of the transformer blocks' streams at b32, which the adapters read too.
from benchmarks.lora_kernels_probe import SHAPES  # noqa: E402
from idmp_jax.models import layers, pallas_norm  # noqa: E402


def config(text: str) -> tuple[int, int]:
  """'TILE,WARPS' (pallas_norm.forward's tile and num_warps)."""
  tile, warps = text.split(",")
  return int(tile), int(warps)


def _copy_kernel(x_ref, d_ref, h_ref, y_ref, *, br: int, programs: int, steps: int):
  """The forward's traffic without its arithmetic: h = x + delta and y = x, `br` whole rows at a time; each program
  takes `steps` blocks, `programs` blocks apart (steps > 1: a persistent grid, its loop for Triton to pipeline)."""
  pid = pl.program_id(0)  # Outside the loop: the interpreter has no program_id inside one.

  def block(i, carry):
    rows = pl.ds((pid + i * programs) * br, br)
    x = x_ref[rows, :]
    h_ref[rows, :] = x + d_ref[rows, :]
    y_ref[rows, :] = x
    return carry

  if steps == 1:
    block(0, 0)
  else:
    jax.lax.fori_loop(0, steps, block, 0)


def copy(x, delta, *, br: int, num_warps: int, steps: int = 1, stages: int = 1, width: int = 512,
         interpret: bool = False):
  """A streaming floor for the forward: its bytes, viewed as rows of `width` (a power of two, no masks); `steps`
  blocks per program (the grid shrinks by as much; it must divide the blocks) and `stages` for Triton's pipeliner."""
  shape = x.shape
  x, delta = x.reshape(-1, width), delta.reshape(-1, width)
  blocks = x.shape[0] // br
  programs = blocks // steps
  out = pl.pallas_call(
      functools.partial(_copy_kernel, br=br, programs=programs, steps=steps), grid=(programs,),
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=stages), interpret=interpret,
      name="copy")(x, delta)
  return [o.reshape(shape) for o in out]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants; medians printed")
  p.add_argument("--levels", type=int, default=len(SHAPES), help="only the first N shapes (largest first)")
  p.add_argument("--configs", type=config, nargs="*",
                 default=[(4096, 4), (1024, 1), (2048, 2), (2048, 1)],
                 help="Pallas kernel configs, each as 'TILE,WARPS' (pallas_norm.TILE and WARPS are the default)")
  p.add_argument("--copies", type=lambda t: tuple(int(v) for v in t.split(",")), nargs="*",
                 default=[(8, 4, 1, 1), (8, 4, 8, 1)],
                 help="Pallas copies with the forward's bytes (rows of 512), each 'ROWS,WARPS,STEPS,STAGES': ROWS "
                 "per block, STEPS blocks per program in a loop (a persistent grid), STAGES for Triton's pipeliner")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  shapes = ((64, 320), (32, 80)) if args.small else SHAPES[:args.levels]
  interpret = args.small
  arr = lambda rows, c: jnp.asarray(rng.standard_normal((rows, c)), jnp.bfloat16)
  print(f"{'rows x C':>14s} {'pass':9s} {'impl':16s} {'us':>9s} {'GB/s':>7s}  (median of {args.rounds} rounds)")
  for rows, c in shapes:
    scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.bfloat16) for _ in range(2))
    xs = [(arr(rows, c), arr(rows, c)) for _ in range(args.buffers)]
    mb = rows * c * 2 / 1e9
    variants = []  # (pass, impl, jitted fn, inputs, passes over a (rows, C) array)

    def xla(fn):
      def run(*a):
        layers.NORM_KERNELS = "xla"  # Read while tracing, inside the jit below.
        try:
          return fn(*a)
        finally:
          layers.NORM_KERNELS = "auto"
      return run

    fwd = lambda xs: [layers.residual_layer_norm(x, d, scale, bias, 1e-5) for x, d in xs]
    fwd1 = lambda xs: [layers.residual_layer_norm(x, None, scale, bias, 1e-5)[1] for x, _ in xs]
    variants += [("fwd+add", "xla", xla(fwd), xs, 4), ("fwd", "xla", xla(fwd1), xs, 2)]
    stats = [pallas_norm.forward(x, None, scale, bias, eps=1e-5, interpret=interpret)[2:] for x, _ in xs]
    bwd_in = [(x, d, arr(rows, c), m, r) for (x, d), (m, r) in zip(xs, stats)]

    def xla_bwd(ins):
      res = lambda h, m, r: (h.reshape(rows, c), scale, bias, m.reshape(rows, 1), r.reshape(rows, 1))
      return [layers._normalize_bwd((1,), 1e-5, False, h.dtype, res(h, m, r), dy)[0] + dh for h, dy, dh, m, r in ins]

    variants.append(("bwd", "xla", xla_bwd, bwd_in, 4))
    for br, warps, steps, stages in args.copies:  # Streaming floors: the forward's bytes, no arithmetic.
      if rows * c % (512 * br * steps) == 0:
        kw = dict(br=br, num_warps=warps, steps=steps, stages=stages, interpret=interpret)
        variants.append(("fwd+add", f"copy {br},{warps},{steps},{stages}",
                         lambda xs, kw=kw: [copy(x, d, **kw) for x, d in xs], xs, 4))
    for tile, warps in args.configs:
      kw = dict(interpret=interpret, num_warps=warps, tile=tile)
      name = f"pallas {tile},{warps}"
      variants += [
          ("fwd+add", name, lambda xs, kw=kw: [pallas_norm.forward(x, d, scale, bias, eps=1e-5, **kw) for x, d in xs],
           xs, 4),
          ("fwd", name, lambda xs, kw=kw: [pallas_norm.forward(x, None, scale, bias, eps=1e-5, **kw)[1]
                                           for x, _ in xs], xs, 2),
          ("bwd", name, lambda ins, kw=kw: [pallas_norm.backward(h, dy, dh, m, r, scale, **kw)
                                            for h, dy, dh, m, r in ins], bwd_in, 4)]
    variants = [(pass_, impl, jax.jit(fn), inputs, passes) for pass_, impl, fn, inputs, passes in variants]
    times = {}
    for _ in range(args.rounds):
      for pass_, impl, fn, inputs, _ in variants:
        key = (pass_, impl)
        if times.get(key) == "failed":
          continue
        try:
          times.setdefault(key, []).append(timed(fn, (inputs,), args.buffers, args.iters))
        except Exception as e:  # A tiling Triton does not compile: say so and go on.
          print(f"{rows:>7d} x {c:<5d} {pass_:9s} {impl:16s} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)
          times[key] = "failed"
    for pass_ in ("fwd+add", "fwd", "bwd"):
      for (p_, impl, _, _, passes) in variants:
        if p_ == pass_ and times.get((p_, impl)) not in (None, "failed"):
          us = statistics.median(times[(p_, impl)])
          print(f"{rows:>7d} x {c:<5d} {p_:9s} {impl:16s} {us:9.1f} {passes * mb / (us * 1e-6):7.0f}", flush=True)


if __name__ == "__main__":
  main()
