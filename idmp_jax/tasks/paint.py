"""Paint one picture: image + masks (+ prompts, or the prompt generator) -> RCA painting of all masks at once.

  python -m idmp_jax.main --config=configs/paint.py --config.image=PATH --config.masks=M1.png,M2.png \
      --config.prompts="a red boat|a stormy sky"
  python -m idmp_jax.main --config=configs/paint.py --config.stem=NAME    # an example of the dataset on disk

Masks keep the order given (prompt i paints mask i); a pixel covered by several masks listens to each of their
prompts (RCA's rule, SPEC §3); pixels outside every mask listen to all prompts. The workdir gets `painting.png`,
`prompts.json` (mask file, colour, prompt) and `grid.png` (input with coloured masks, prompts under it, result).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from idmp_jax import parallel, sampling
from idmp_jax.data import files
from idmp_jax.data.inpainting import InpaintingConfig, make_inpainting_example
from idmp_jax.data.llava import COLORS
from idmp_jax.data.tokenizer import load_clip_tokenizer

MAX_PIXELS = 4096 * 4096


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "paint"
  c.name = "paint"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # One painting: replicated.
  c.dtype = "bfloat16"
  c.attention = "auto"
  c.model_dir = "tiny"        # SD-2 inpainting folder; "tiny" builds a tiny random one (the painting is noise).
  c.lora = ""
  c.image = ""                # The painting to fill in.
  c.masks = ""                # Comma-separated mask PNGs (white = paint here), same size as the image.
  c.prompts = ""              # "|"-separated, one per mask; empty: the prompt generator writes them.
  c.stem = ""                 # Instead of image/masks: an example of the dataset (first masks by area, captions).
  c.data_dir = ""
  c.split = "test"
  c.max_concepts = 5
  c.resolution = 512
  c.num_inference_steps = 50
  c.guidance_scale = 7.5
  c.scheduler = ""
  return c


def _read_inputs(config):
  """(image, [(name, uint8 mask)], prompts or None), every problem named by file."""
  if config.stem:
    layout = files.Layout(config.data_dir)
    image, anns, masks = files.read_example(layout, config.split, config.stem, ("caption",))
    names = sorted(anns, key=lambda n: -int(masks[n].astype(np.int64).sum()))[:config.max_concepts]
    prompts = [p.strip() for p in config.prompts.split("|")] if config.prompts else [anns[n]["caption"] for n in names]
    return image, [(n, masks[n]) for n in names], prompts
  if not config.image:
    raise ValueError("config.image is empty: give an image (and config.masks), or config.stem")
  image = files.read_image(config.image)
  if image.width * image.height > MAX_PIXELS:
    raise ValueError(f"{config.image}: {image.width}x{image.height} is larger than the limit of {MAX_PIXELS} pixels")
  mask_paths = [m for m in config.masks.split(",") if m]
  if not mask_paths:
    raise ValueError("config.masks is empty: give at least one mask PNG")
  if len(mask_paths) > config.max_concepts:
    raise ValueError(f"config.masks: {len(mask_paths)} masks, at most config.max_concepts = {config.max_concepts}")
  masks = []
  for path in mask_paths:
    m = files.read_mask(path, image.size)  # Raises naming the file on a size mismatch or a bad file.
    m = np.where(m >= 128, 255, 0).astype(np.uint8)
    if not m.any():
      raise ValueError(f"{path}: the mask is empty (no pixel >= 128)")
    masks.append((os.path.splitext(os.path.basename(path))[0], m))
  prompts = None
  if config.prompts:
    prompts = [p.strip() for p in config.prompts.split("|")]
    if len(prompts) != len(masks) or not all(prompts):
      raise ValueError(f"config.prompts: {len(prompts)} prompt(s) for {len(masks)} mask(s), none may be empty")
  return image, masks, prompts


def overlay(image01: np.ndarray, masks, alpha: float = 0.5) -> np.ndarray:
  """The image with each mask tinted in its colour (SPEC §8 colour order)."""
  out = image01.copy()
  for (_, m), color in zip(masks, COLORS.values()):
    sel = m > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(color, np.float32) / 255
  return out


def grid(input01: np.ndarray, masks, prompts, result01: np.ndarray) -> Image.Image:
  """Input with coloured masks | result, and the prompts under them, each in its mask's colour."""
  h, w = result01.shape[:2]
  line = 16
  canvas = Image.new("RGB", (2 * w, h + line * (len(prompts) + 1)), "white")
  canvas.paste(Image.fromarray((overlay(input01, masks) * 255).astype(np.uint8)), (0, 0))
  canvas.paste(Image.fromarray((result01 * 255).round().astype(np.uint8)), (w, 0))
  draw = ImageDraw.Draw(canvas)
  for i, (prompt, color) in enumerate(zip(prompts, COLORS.values())):
    draw.text((4, h + 4 + i * line), f"{list(COLORS)[i]}: {prompt}", fill=tuple(color))
  return canvas


def run(config, workdir: str, mesh) -> dict:
  image, masks, prompts = _read_inputs(config)
  model_dir = config.model_dir
  if model_dir == "tiny":
    from idmp_jax import tiny
    model_dir = tiny.make_tiny_pipeline(os.path.join(workdir, "tiny_pipeline"), seed=config.seed)
    print("model_dir=tiny: a tiny random pipeline, so the painting is noise; give "
          "--config.model_dir=.../stable-diffusion-2-inpainting for a real one")
  if prompts is None:
    raise NotImplementedError("config.prompts is empty and the prompt generator is not wired into `paint` yet: "
                              "give one prompt per mask with --config.prompts='a|b|...'")
  models, params = sampling.load_models(model_dir, lora=config.lora)
  tokenizer = load_clip_tokenizer(model_dir)
  names = [n for n, _ in masks]
  annotations = {n: {"caption": p} for n, p in zip(names, prompts)}
  data_config = InpaintingConfig(resolution=config.resolution, max_concepts=config.max_concepts,
                                 masked_area_threshold=None, shuffle_concepts=False, rca=True, extras=True)
  example = make_inpainting_example(image, annotations, dict(masks), tokenizer, data_config,
                                    np.random.default_rng(config.seed), selection=names)
  batch = {k: example[k][None] for k in ("pixel_values", "mask", "input_ids", "token_region", "region_masks")}
  batch["uncond_ids"] = tokenizer([""])[0]
  dtype = jnp.dtype(config.dtype)
  fn = jax.jit(sampling.make_sample_fn(models, sampling.SamplerOptions(
      num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
      scheduler=config.scheduler, dtype=dtype, attention_impl=config.attention)))
  latent_shape = (config.resolution // models.vae.downscale,) * 2 + (models.vae.latent_channels,)
  noise, posterior = sampling.draw_noise(sampling.example_key(config.seed, "paint")[None], latent_shape)
  params = jax.device_put(sampling.cast_params(params, dtype), parallel.replicated(mesh))
  batch, noise, posterior = jax.device_put((batch, noise, posterior), parallel.replicated(mesh))
  result = np.asarray(fn(params, batch, noise, posterior))[0]

  os.makedirs(workdir, exist_ok=True)
  Image.fromarray((result * 255).round().astype(np.uint8)).save(os.path.join(workdir, "painting.png"))
  record = [dict(mask=n, color=c, prompt=p) for n, c, p in zip(names, COLORS, prompts)]
  with open(os.path.join(workdir, "prompts.json"), "w") as f:
    json.dump(record, f, indent=2)
  crops = [(n, m) for n, m in zip(names, (example["masks"][:len(names)] * 255).astype(np.uint8))]
  grid(example["pixel_values"] / 2 + 0.5, crops, prompts, result).save(os.path.join(workdir, "grid.png"))
  print(f"painted {len(masks)} mask(s) -> {workdir}/painting.png, prompts.json, grid.png")
  return dict(painting=os.path.join(workdir, "painting.png"), prompts=record)
