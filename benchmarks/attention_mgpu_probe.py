"""The UNet's self-attention at b32 (64x64 and 32x32 latents, head dim 64) on JAX's Mosaic GPU flash attention
(`jax.experimental.pallas.ops.gpu.attention_mgpu`, Hopper wgmma, forward and backward) against cuDNN's, which
takes ~33 ms of the LoRA step (issue 5). Per tiling: forward and forward + backward time, TFLOP/s, and the
output's and gradients' error against cuDNN's (so a fast wrong kernel shows).

  python benchmarks/attention_mgpu_probe.py                    # on a Hopper GPU
  python benchmarks/attention_mgpu_probe.py --dtype float16    # JAX 0.11.2's kernel refuses bf16 (f16 buffers)

FLOPs: forward 4·B·N·T²·H, backward 2.5x that. Each timed call is a jit over --buffers distinct inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402

SHAPES = ((4096, 5), (1024, 10))  # (tokens, heads) of the 64x64 and 32x32 levels; head dim 64.
# (block_q, block_kv, max_concurrent_steps, compute_wgs_bwd, block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq)
TILINGS = ((64, 128, 2, 1, 64, 64, 64, 64), (64, 64, 2, 1, 64, 128, 128, 64), (64, 128, 4, 2, 64, 64, 64, 64),
           (64, 256, 2, 1, 64, 128, 128, 64), (64, 128, 2, 2, 128, 64, 64, 128))


def cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation="cudnn")


def mgpu(tiling):
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  bq, bkv, steps, wgs, q_dkv, kv_dkv, q_dq, kv_dq = tiling
  fields = {f.name for f in dataclasses.fields(am.TuningConfig)}
  kw = dict(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, compute_wgs_bwd=wgs, block_q_dkv=q_dkv,
            block_kv_dkv=kv_dkv, block_q_dq=q_dq, block_kv_dq=kv_dq)
  config = am.TuningConfig(**{k: v for k, v in kw.items() if k in fields})

  def fn(q, k, v):  # The kernel does not scale the logits: scale q (by 1/8 for head dim 64: exact in bf16).
    return am.attention(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v, config=config)
  return fn


def measure(fn, inputs, cot, buffers, iters):
  fwd = jax.jit(lambda xs: [fn(*x) for x in xs])

  def fwd_bwd(xs):
    return [jax.vjp(fn, *x)[1](cot) for x in xs]
  return timed(fwd, (inputs,), buffers, iters), timed(jax.jit(fwd_bwd), (inputs,), buffers, iters)


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--buffers", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  b = args.batch
  print(f"{'impl':44s} {'fwd us':>8s} {'f+b us':>8s} {'fwd TF/s':>8s} {'f+b TF/s':>8s} {'err o':>8s} {'err dq':>8s}")
  for t, n in SHAPES:
    make = lambda: jnp.asarray(rng.standard_normal((b, t, n, 64)), args.dtype)
    inputs = [(make(), make(), make()) for _ in range(args.buffers)]
    cot = make()
    flops = 4 * b * n * t * t * 64
    ref_o = cudnn(*inputs[0])
    ref_dq = jax.vjp(cudnn, *inputs[0])[1](cot)[0]
    for name, fn in [("cudnn", cudnn)] + [(f"mgpu {tiling}", mgpu(tiling)) for tiling in TILINGS]:
      try:
        f, fb = measure(fn, inputs, cot, args.buffers, args.iters)
        o = fn(*inputs[0])
        dq = jax.vjp(fn, *inputs[0])[1](cot)[0]
        print(f"{name + f' T={t} N={n}':44s} {f:8.1f} {fb:8.1f} {flops / f / 1e6:8.1f} {3.5 * flops / fb / 1e6:8.1f} "
              f"{rel(o, ref_o):8.1e} {rel(dq, ref_dq):8.1e}", flush=True)
      except Exception as e:  # A tiling the kernel refuses (shared memory, shape): say so and go on.
        print(f"{name + f' T={t} N={n}':44s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)


if __name__ == "__main__":
  main()
