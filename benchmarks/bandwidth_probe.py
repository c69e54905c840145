"""How fast XLA's own elementwise and reduction kernels stream on this GPU, beside a plain device copy: the
ceiling the UNet step's glue (norms, GEGLU, dropout; issue 5) can reach without hand-written kernels. Run it
under different XLA_FLAGS to see whether a code-generation flag moves that ceiling.

  python benchmarks/bandwidth_probe.py [--rows 131072 --features 320]
  XLA_FLAGS=--xla_gpu_... python benchmarks/bandwidth_probe.py

Each op is one jit over one bf16 (rows, features) input (the UNet's 64x64-level activations at b32 by default),
called --iters times back to back and waited for once. TB/s counts each input read once and each output
written once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def rate(fn, args, nbytes: int, iters: int) -> tuple[float, float]:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  us = (time.perf_counter() - t0) / iters * 1e6
  return us, nbytes / us / 1e6


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=32 * 4096)
  p.add_argument("--features", type=int, default=320)
  p.add_argument("--iters", type=int, default=50)
  args = p.parse_args(argv)
  shape = (args.rows, args.features)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, shape, jnp.bfloat16)
  y = jax.random.normal(k2, shape, jnp.bfloat16)
  b = x.size * 2
  ops = {
      "copy (jnp.copy)": (jax.jit(jnp.copy), (x,), 2 * b),
      "scale x * 1.5": (jax.jit(lambda x: x * jnp.asarray(1.5, x.dtype)), (x,), 2 * b),
      "add x + y": (jax.jit(lambda x, y: x + y), (x, y), 3 * b),
      "silu(x) in f32": (jax.jit(lambda x: jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)), (x,), 2 * b),
      "row sums (f32)": (jax.jit(lambda x: x.astype(jnp.float32).sum(1)), (x,), b),
      "column sums (f32)": (jax.jit(lambda x: x.astype(jnp.float32).reshape(32, -1, shape[1]).sum(1)), (x,), b),
  }
  print(f"{jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; x {shape} bf16")
  for name, (fn, a, nbytes) in ops.items():
    us, tbs = rate(fn, a, nbytes, args.iters)
    print(f"  {name:20s} {us:8.1f} us  {tbs:5.2f} TB/s", flush=True)


if __name__ == "__main__":
  main()
