"""The app's "Paint" with generated prompts, end to end, at the real model shapes with random weights: seconds from
the click to the result for one 512 px painting with 3 masks, and the start-up time.

  python3 benchmarks/paint.py [--steps 50] [--new-tokens 40] [--iters 5] [--out results.json]
  python3 benchmarks/paint.py --tiny      # CPU smoke test of the script itself (tiny shapes, 64 px, 3 steps)

What one request does (the app's and the paint command's code: `idmp_jax.painter.Painter`):
  prompts   the MultiMask prompt generator (LLaVA-NeXT vicuna-7b shape, bf16) on the 512 px crop with the 3 masks
            painted: anyres 672x672 (5 views, ~2.9k image tokens + the question), greedy, stop string </red>,
            at most --new-tokens new tokens (random weights never write </red>, so every request makes all of
            them: the worst case), host stop-string checks every --chunk tokens;
  paint     the RCA sampler (SD-2 inpainting shapes, bf16): VAE encode, --steps PNDM steps with classifier-free
            guidance 7.5 (batch 2 through the UNet), VAE decode, progress polled as the app does.
Start-up = making the weights (random here, on the device: loading real ones from disk is not timed) + the
warm-up the app does before serving (first prompts + first painting: compilation). Then --iters timed requests
(each with new masks and a new seed, same shapes: no recompilation), each ended by a host copy of the result
(block_until_ready), median reported. Tokens: the question is encoded with the tiny test tokenizer (ids are valid
for the 7B vocabulary; the question has the same length within a few tokens, and the length is bucketed to 256).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import llava as llava_bench
from benchmarks import sampling as sampling_bench
from idmp_jax import painter as painter_lib
from idmp_jax import tiny, tiny_llava
from idmp_jax.data import llava_processor as lp
from idmp_jax.data.tokenizer import load_clip_tokenizer
from idmp_jax.models import llava_next as ln
from idmp_jax.tasks import promptgen_generate as pg

# llava-hf/llava-v1.6-vicuna-7b-hf's preprocessor_config.json (the fields our processor reads).
LLAVA_16_PREPROCESSOR = {
    "image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 336},
    "crop_size": {"height": 336, "width": 336}, "do_resize": True, "do_center_crop": True, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True, "do_convert_rgb": True, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}


def make_writer(args, folder):
  """A MaskPromptWriter with random weights: the 7B shapes (or the tiny LLaVA's with --tiny)."""
  ids = tiny_llava.make_tiny_tokenizer(folder)  # tokenizer.json + tokenizer_config.json
  if args.tiny:
    config = tiny_llava.tiny_config(**ids)
    proc = {**LLAVA_16_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
            "image_grid_pinpoints": [list(p) for p in tiny_llava.PINPOINTS]}
  else:  # The 7B shapes; <image> takes the test tokenizer's id (the embedding row it would have is never read).
    config = dataclasses.replace(ln.LlavaNextConfig(), image_token_index=ids["image_token"])
    proc = LLAVA_16_PREPROCESSOR
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(proc, f)
  params = llava_bench.random_params(config, jnp.dtype(args.dtype))
  return pg.MaskPromptWriter(config, params, pg.LlavaTokenizer(folder), lp.ImageProcessorConfig.load(folder),
                             dtype=jnp.dtype(args.dtype), max_new_tokens=args.new_tokens, chunk_size=args.chunk)


def make_request(rng, size: int, k: int = 3):
  """A smooth random painting and k overlapping rectangular masks (different every request, same shapes)."""
  low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
  image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
  masks = []
  for color in ("red", "green", "blue")[:k]:
    y0, x0 = rng.integers(0, size // 2, 2)
    h, w = rng.integers(size // 6, size // 2, 2)
    pixels = np.zeros((size, size), np.uint8)
    pixels[y0:y0 + h, x0:x0 + w] = 255
    masks.append(painter_lib.Mask(f"{color} box", color, pixels))
  return image, masks


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script runs")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--new-tokens", type=int, default=40)
  p.add_argument("--chunk", type=int, default=8, help="decode steps per device call between stop-string checks")
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.tiny:
    args.steps, args.size, args.iters, args.new_tokens, args.dtype = 3, 64, 2, 8, "float32"
  print(f"devices: {jax.devices()}", flush=True)

  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as folder:
    writer = make_writer(args, folder)
    models, params = sampling_bench.build(small=args.tiny)
    clip_tok = load_clip_tokenizer(tiny.make_char_clip_tokenizer(os.path.join(folder, "clip_tokenizer")))
    painter = painter_lib.Painter(models, params, clip_tok, writer, resolution=args.size, dtype=args.dtype,
                                  num_inference_steps=args.steps, guidance_scale=args.guidance)
    del params
    jax.block_until_ready(painter.params)
    weights_s = time.perf_counter() - t0
    warm_s = painter.warm_up()
  startup_s = time.perf_counter() - t0
  print(f"start-up: random weights {weights_s:.1f} s + warm-up (compilation) {warm_s:.1f} s = {startup_s:.1f} s",
        flush=True)

  rng = np.random.default_rng(0)
  rows = []
  for i in range(args.iters):
    image, masks = make_request(rng, args.size)
    t0 = time.perf_counter()
    prompts, _, _ = painter.write_prompts(image, masks)
    t1 = time.perf_counter()
    ticks = []
    result = painter.paint(image, masks, [p or "x" for p in prompts], seed=i,
                           on_progress=lambda done, total: ticks.append(done))
    t2 = time.perf_counter()  # paint() ends with a host copy of the image: the device work is done.
    assert result.image.shape == (args.size, args.size, 3) and np.isfinite(result.image).all()
    rows.append(dict(prompts_s=t1 - t0, paint_s=t2 - t1, total_s=t2 - t0, progress_updates=len(ticks)))
    print(json.dumps(rows[-1]), flush=True)
  med = {k: statistics.median(r[k] for r in rows) for k in ("prompts_s", "paint_s", "total_s")}
  summary = dict(device=jax.devices()[0].device_kind, size=args.size, masks=3, steps=args.steps,
                 guidance=args.guidance, new_tokens=args.new_tokens, dtype=args.dtype, iters=args.iters,
                 startup_s=startup_s, weights_s=weights_s, warmup_s=warm_s,
                 **{f"median_{k}": v for k, v in med.items()},
                 runs=rows, date=time.strftime("%Y-%m-%d"))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)
  print(f"paint {args.size}px, 3 masks, {args.new_tokens} new tokens + {args.steps} RCA steps (CFG "
        f"{args.guidance}) on {summary['device']}: {med['total_s']:.2f} s from Paint to result (median of "
        f"{args.iters}: prompts {med['prompts_s']:.2f} s + painting {med['paint_s']:.2f} s); start-up "
        f"{startup_s:.1f} s (weights {weights_s:.1f} s + compilation {warm_s:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
