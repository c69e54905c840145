"""50-step multi-mask inpainting at 512 px with CFG, batch 8, bf16, full SD-2 inpainting shapes, random weights:
seconds per image for our jitted sampler (RCA on and off) and, with --torch, diffusers' PyTorch pipeline (fp16, stock
attention) on the same weights (written as diffusers/transformers folders, fp16) in the same run.

  python benchmarks/sampling.py [--batch 8] [--steps 50] [--torch] [--small]
"""
from __future__ import annotations

import argparse
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

from idmp_jax import sampling, tiny
from idmp_jax.train import tiny as train_tiny
from idmp_jax.models import clip, unet, vae
from idmp_jax.tasks.unet_forward import random_regions

SD2_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32, latent_channels=4,
               sample_size=768)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, hidden_act="gelu", eos_token_id=2, max_position_embeddings=77)


def build(small: bool):
  if small:
    ucfg = unet.UNetConfig.from_dict(tiny.TINY_UNET)
    vcfg = vae.AutoencoderKLConfig.from_dict(tiny.TINY_VAE)
    tcfg = tiny.tiny_text_config(ucfg.cross_attention_dim)
  else:
    ucfg, vcfg, tcfg = unet.UNetConfig(), vae.AutoencoderKLConfig.from_dict(SD2_VAE), clip.CLIPTextConfig(**SD2_TEXT)
  # NumPy draws from the abstract trees (as benchmarks/train_step.py does). The jitted `init`s took 160 s even at
  # the tiny shapes on the 2-core CPU, and on the GPU machine two runs printed nothing within 190 s.
  key = jax.random.key(0)
  abstract = dict(
      unet=unet.abstract_params(ucfg),
      vae=jax.eval_shape(lambda: vae.AutoencoderKL(vcfg).init(key, jnp.zeros((1, 16, 16, 3))))["params"],
      text=jax.eval_shape(lambda: clip.CLIPTextTransformer(tcfg).init(key, jnp.zeros((1, 77), jnp.int32)))["params"])
  host = {name: train_tiny.random_params(tree, seed) for seed, (name, tree) in enumerate(abstract.items())}
  return sampling.Models(ucfg, vcfg, tcfg, dict(tiny.SD2_SCHEDULER)), host


def write_torch_folders(models: sampling.Models, host: dict, folder: str, dtype) -> str:
  """The same weights as diffusers/transformers folders, for --torch."""
  unet.save_pretrained(os.path.join(folder, "unet"), models.unet, host["unet"], dtype=dtype)
  vae.save_vae(os.path.join(folder, "vae"), models.vae, host["vae"], dtype=dtype)
  clip.save_text_encoder(os.path.join(folder, "text_encoder"), models.text, host["text"], dtype=dtype)
  return folder


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--torch", action="store_true")
  p.add_argument("--small", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.small:
    args.size, args.steps, args.batch, args.iters = 64, 3, 2, 1
  t0 = time.perf_counter()
  models, host = build(args.small)
  params = jax.block_until_ready(sampling.cast_params(jax.device_put(host), jnp.bfloat16))
  print(f"random params on {jax.devices()[0].device_kind} in {time.perf_counter() - t0:.1f} s", flush=True)
  rng = np.random.default_rng(0)
  b, s = args.batch, args.size
  rm, tr = random_regions(rng, b, s, num_masks=5, max_concepts=5)
  batch = dict(pixel_values=jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
               mask=jnp.asarray(rm[:, 1:].max(1)[..., None] * (rm[:, 1:].min(1)[..., None] < 1), jnp.float32),
               input_ids=jnp.asarray(rng.integers(1, 500, (b, 77)), jnp.int32),
               uncond_ids=jnp.asarray(np.r_[[49406 if not args.small else 512], np.zeros(76)], jnp.int32),
               token_region=jnp.asarray(tr), region_masks=jnp.asarray(rm))
  lat = (s // 8, s // 8, 4)
  noise = jnp.asarray(rng.standard_normal((b,) + lat), jnp.float32)
  post = jnp.asarray(rng.standard_normal((b,) + lat), jnp.float32)
  results = []
  for rca in (True, False):
    fn = jax.jit(sampling.make_sample_fn(models, sampling.SamplerOptions(num_inference_steps=args.steps,
                                                                         dtype=jnp.bfloat16)))
    bt = batch if rca else {k: v for k, v in batch.items() if k not in ("token_region", "region_masks")}
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, bt, noise, post))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(params, bt, noise, post))
      times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    assert np.isfinite(np.asarray(out)).all()
    results.append(dict(framework="jax", rca=rca, batch=b, steps=args.steps, s_per_batch=med, s_per_image=med / b,
                        first_call_s=compile_s))
    print(f"jax   rca={'on ' if rca else 'off'} b{b} {args.steps} steps: {med:.3f} s/batch = {med / b:.4f} s/img "
          f"(first call incl. compile {compile_s:.1f} s)", flush=True)
  if args.torch:
    del params
    try:
      with tempfile.TemporaryDirectory(prefix="idmp_sampling_torch_") as folder:
        # fp16 weights for the fp16 pipeline; fp32 for the CPU smoke test (--small).
        dtype = np.float32 if args.small else np.float16
        results.append(bench_torch(args, write_torch_folders(models, host, folder, dtype)))
    except Exception as e:
      print(f"torch FAILED: {type(e).__name__}: {e}", flush=True)
  summary = dict(device=jax.devices()[0].device_kind, results=results, date=time.strftime("%Y-%m-%d"))
  if args.out:
    json.dump(summary, open(args.out, "w"), indent=2)
  print(json.dumps(summary))


def bench_torch(args, folder: str):
  """diffusers' pipeline on our weights (`folder` from write_torch_folders)."""
  import torch
  from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
  from transformers import CLIPTextModel
  torch.manual_seed(0)
  # CPU (fp32) only to smoke-test this function with --small; the reported figure is CUDA fp16.
  dev, dt = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
  u = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=dt)
  v = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=dt)
  t = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=dt)
  pipe = StableDiffusionInpaintPipeline(vae=v, text_encoder=t, tokenizer=None, unet=u,
                                        scheduler=PNDMScheduler(**{k: x for k, x in tiny.SD2_SCHEDULER.items()
                                                                   if not k.startswith("_") and k != "clip_sample"}),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe = pipe.to(dev, dt)
  pipe.set_progress_bar_config(disable=True)
  b, s = args.batch, args.size
  image = torch.rand(b, 3, s, s, device=dev, dtype=dt)  # diffusers takes [0, 1] tensors
  mask = (torch.rand(b, 1, s, s, device=dev) > 0.5).to(dt)
  emb = torch.randn(b, 77, t.config.hidden_size, device=dev, dtype=dt)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def call():
    return pipe(prompt_embeds=emb, negative_prompt_embeds=emb, image=image, mask_image=mask, height=s, width=s,
                num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
  call()
  times = []
  for _ in range(args.iters):
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  print(f"torch diffusers pipeline {dt} (stock attention, no RCA) b{b} {args.steps} steps: {med:.3f} s/batch = "
        f"{med / b:.4f} s/img", flush=True)
  return dict(framework="torch", rca=False, batch=b, steps=args.steps, s_per_batch=med, s_per_image=med / b)


if __name__ == "__main__":
  main()
