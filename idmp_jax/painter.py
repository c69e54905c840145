"""One painting at a time, for the paint command and the web app: image + masks (+ prompts) -> RCA painting.

`Painter` loads the SD-2 inpainting pipeline (and, when prompts are to be written, the MultiMask LLaVA-NeXT) once,
and compiles once per setting that changes the program (number of steps, scheduler, CFG on/off); shapes are fixed
by `resolution` and `max_concepts` (region masks are padded to max_concepts + 1), so a new painting with new masks,
prompts, seed or guidance scale reuses the compiled code.

Masks keep their colour (SPEC §8's list: red, green, blue, yellow, cyan, ...) from input to output: prompt i
paints mask i, and the prompt generator is asked about each mask by its colour. The sampler sees the image and the
masks as the dataset's examples do (shorter side -> `resolution`, centre crop, SPEC §2.4); the prompt generator
sees that same crop with the masks painted on (SPEC §6, the -Gen prompts). A pixel covered by several masks listens
to every covering mask's prompt; a pixel outside every mask listens to all prompts (RCA, SPEC §3).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from idmp_jax import sampling, schedulers
from idmp_jax.data.inpainting import InpaintingConfig, make_inpainting_example
from idmp_jax.data.llava import COLORS
from idmp_jax.data.tokenizer import load_clip_tokenizer
from idmp_jax.models import quantize

MAX_PIXELS = 4096 * 4096
SCHEDULERS = ("", "pndm", "ddim", "dpm++")  # "" = the model folder's own (SD-2: PNDM).


class InputError(ValueError):
  """A problem with what the user gave, worded for them: the app shows it on the page, the command raises it."""


@dataclasses.dataclass
class Mask:
  name: str            # File stem or "red brush" ...: how messages name it.
  color: str           # A COLORS key: the mask's identity from the editor to prompts.json.
  pixels: np.ndarray   # (H, W) uint8, 0 / 255.


@dataclasses.dataclass
class Painting:
  image: np.ndarray    # (R, R, 3) float32 in [0, 1]: the result.
  input: np.ndarray    # (R, R, 3) float32 in [0, 1]: the crop the sampler saw.
  masks: list          # [Mask] cropped to (R, R), in prompt order.
  prompts: list        # [str], one per mask.
  seconds: float       # Wall time of the sampler call (compilation included when it compiled).

  def record(self) -> list[dict]:
    """What prompts.json holds: one entry per mask, in order."""
    return [dict(mask=m.name, color=m.color, prompt=p) for m, p in zip(self.masks, self.prompts)]


def binarize(mask: np.ndarray) -> np.ndarray:
  return np.where(np.asarray(mask) >= 128, 255, 0).astype(np.uint8)


def check_inputs(image: Image.Image, masks: Sequence[Mask], max_concepts: int, max_pixels: int = MAX_PIXELS,
                 prompts: Optional[Sequence[str]] = None) -> list[Mask]:
  """The masks binarised at 128, or InputError naming the mask (file or colour) and what is wrong with it."""
  w, h = image.size
  if w * h > max_pixels:
    raise InputError(f"the painting is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} pixels "
                     f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)})")
  if not masks:
    raise InputError("no mask: draw at least one with the brush, or upload a mask PNG (white = paint here)")
  if len(masks) > max_concepts:
    raise InputError(f"{len(masks)} masks, but at most max_concepts = {max_concepts} can be painted at once")
  colors = [m.color for m in masks]
  if len(set(colors)) != len(colors) or not set(colors) <= set(COLORS):
    raise InputError(f"mask colours must be distinct names of {list(COLORS)}, got {colors}")
  out = []
  for m in masks:
    mh, mw = np.shape(m.pixels)[:2]
    if (mw, mh) != (w, h):
      raise InputError(f"mask {m.name!r} is {mw}x{mh} but the painting is {w}x{h}: masks must have the image's size")
    pixels = binarize(m.pixels)
    if not pixels.any():
      raise InputError(f"mask {m.name!r} ({m.color}) is empty: no pixel is white (>= 128)")
    out.append(Mask(m.name, m.color, pixels))
  if prompts is not None:
    if len(prompts) != len(out):
      raise InputError(f"{len(prompts)} prompt(s) for {len(out)} mask(s): give one prompt per mask")
    for m, p in zip(out, prompts):
      if not p.strip():
        raise InputError(f"the prompt of the {m.color} mask ({m.name!r}) is empty")
  return out


def overlaps(masks: Sequence[Mask]) -> list[tuple[str, str, int]]:
  """(colour, colour, pixels) for every pair of masks that share pixels."""
  out = []
  for i, a in enumerate(masks):
    for b in masks[i + 1:]:
      n = int(np.count_nonzero((a.pixels > 0) & (b.pixels > 0)))
      if n:
        out.append((a.color, b.color, n))
  return out


def overlay(image01: np.ndarray, masks: Sequence[Mask], alpha: float = 0.5) -> np.ndarray:
  """The image with each mask tinted in its colour (later masks over earlier ones)."""
  out = np.array(image01, np.float32)
  for m in masks:
    sel = m.pixels > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(COLORS[m.color], np.float32) / 255
  return out


def regions_overlay(image01: np.ndarray, masks: Sequence[Mask], alpha: float = 0.55) -> np.ndarray:
  """Which prompts each pixel listens to (RCA): a pixel inside masks is tinted with the mean colour of every mask
  covering it (so overlaps show as mixes); a pixel outside every mask listens to all prompts and stays as it is."""
  stack = np.stack([m.pixels > 0 for m in masks]).astype(np.float32)             # (K, H, W)
  colors = np.asarray([COLORS[m.color] for m in masks], np.float32) / 255         # (K, 3)
  count = stack.sum(0)
  mean = np.einsum("khw,kc->hwc", stack, colors) / np.maximum(count, 1)[..., None]
  inside = (count > 0)[..., None]
  return np.where(inside, (1 - alpha) * np.asarray(image01, np.float32) + alpha * mean, image01)


def to_image(x01: np.ndarray) -> Image.Image:
  return Image.fromarray((np.clip(x01, 0, 1) * 255).round().astype(np.uint8))


def grid(painting: Painting) -> Image.Image:
  """Input with coloured masks | result, and the prompts under them, each in its mask's colour."""
  h, w = painting.image.shape[:2]
  line = 16
  canvas = Image.new("RGB", (2 * w, h + line * (len(painting.prompts) + 1)), "white")
  canvas.paste(to_image(overlay(painting.input, painting.masks)), (0, 0))
  canvas.paste(to_image(painting.image), (w, 0))
  draw = ImageDraw.Draw(canvas)
  for i, (m, prompt) in enumerate(zip(painting.masks, painting.prompts)):
    draw.text((4, h + 4 + i * line), f"{m.color}: {prompt}", fill=tuple(COLORS[m.color]))
  return canvas


def save_outputs(painting: Painting, folder: str, *, with_grid: bool = True) -> dict:
  """Writes painting.png, prompts.json (and grid.png); returns their paths."""
  os.makedirs(folder, exist_ok=True)
  paths = dict(painting=os.path.join(folder, "painting.png"), prompts=os.path.join(folder, "prompts.json"))
  to_image(painting.image).save(paths["painting"])
  with open(paths["prompts"], "w", encoding="utf-8") as f:
    json.dump(painting.record(), f, indent=2, ensure_ascii=False)
  if with_grid:
    paths["grid"] = os.path.join(folder, "grid.png")
    grid(painting).save(paths["grid"])
  return paths


# Compiled samplers shared by every Painter of the process (keyed by the model configs and the settings that
# change the program), so a second Painter of the same models (the command run twice in one process, tests) does
# not compile again. One painting at a time per process: the progress count below is global.
_SAMPLERS: dict = {}
_LOCK = threading.Lock()
_UNET_CALLS = [0]  # UNet calls of the running request, counted by the sampler's host callback.


def _count_unet_call(timestep):
  del timestep
  _UNET_CALLS[0] += 1


class Painter:
  """Models loaded and placed once; `write_prompts` and `paint` reuse compiled code for every request of the same
  settings. Requests run one at a time (a process-wide lock; the app's queue also runs one at a time)."""

  def __init__(self, models: sampling.Models, params: dict, clip_tokenizer, prompt_writer=None, *,
               resolution: int = 512, max_concepts: int = 5, dtype: str = "bfloat16", attention: str = "auto",
               seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5, scheduler: str = "",
               max_pixels: int = MAX_PIXELS, notes: Sequence[str] = (), load_seconds: float = 0.0):
    """From loaded parts (`load` reads them from model folders): params as `sampling.load_models` gives them
    (cast to `dtype` and placed here), the pipeline's CLIP tokenizer, an optional MaskPromptWriter."""
    if not 1 <= max_concepts <= len(COLORS):
      raise ValueError(f"max_concepts = {max_concepts}: must be in 1..{len(COLORS)} (one colour per mask)")
    if resolution % 8:
      raise ValueError(f"resolution = {resolution}: must be a multiple of 8 (the VAE's downscale)")
    self.resolution, self.max_concepts, self.max_pixels = resolution, max_concepts, max_pixels
    self.dtype, self.attention, self.seed = jnp.dtype(dtype), attention, seed
    self.defaults = dict(steps=num_inference_steps, guidance=guidance_scale, scheduler=scheduler)
    self.notes = list(notes)  # What a person should know about these models (the command and the app show it).
    self.models = models
    self.params = jax.device_put(sampling.cast_params(params, self.dtype))
    self.tokenizer = clip_tokenizer
    self.uncond_ids = clip_tokenizer([""])[0]
    self.data_config = InpaintingConfig(resolution=resolution, max_concepts=max_concepts, masked_area_threshold=None,
                                        shuffle_concepts=False, rca=True, extras=True)
    self.prompt_writer = prompt_writer
    self.load_seconds = load_seconds

  @classmethod
  def load(cls, *, model_dir: str = "tiny", llava_dir: str = "tiny", llava_adapter: str = "",
           llava_quantize: str = "", llava_kv_cache: str = "", workdir: str = "workdir/paint", lora: str = "",
           load_prompt_writer: bool = True, prompt_max_new_tokens: int = 128, prompt_chunk_size: int = 16,
           dtype: str = "bfloat16", attention: str = "auto", seed: int = 0, log: Callable[[str], None] = print,
           **options) -> "Painter":
    """From model folders; "tiny" builds a tiny random one in workdir (no downloads) and says so."""
    quantize.check_format(llava_quantize, "config.llava_quantize")
    if llava_kv_cache not in ("", "int8"):
      raise ValueError(f"config.llava_kv_cache = {llava_kv_cache!r}: expected one of ('', 'int8')")
    t0 = time.perf_counter()
    notes = []
    if model_dir == "tiny":  # NumPy-drawn weights: no compilation (make_tiny_pipeline's Linen init has one).
      from idmp_jax.train.tiny import write_random_pipeline
      model_dir = os.path.join(workdir, "tiny_pipeline")
      if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        write_random_pipeline(model_dir, seed=seed)
      notes.append("model_dir=tiny: a tiny random SD-2 inpainting pipeline, so the painting is noise; give "
                   "--config.model_dir=.../stable-diffusion-2-inpainting for real paintings")
    models, params = sampling.load_models(model_dir, lora=lora)
    writer = None
    if load_prompt_writer:
      from idmp_jax.tasks.promptgen_generate import MaskPromptWriter
      writer = MaskPromptWriter.load(llava_dir, adapter=llava_adapter, quantize=llava_quantize,
                                     kv_cache=llava_kv_cache, dtype=jnp.dtype(dtype), attention=attention,
                                     workdir=workdir, seed=seed, max_new_tokens=prompt_max_new_tokens,
                                     chunk_size=prompt_chunk_size)
      if llava_dir == "tiny":
        notes.append("llava_dir=tiny: a tiny random LLaVA-NeXT, so the prompts are random text; give "
                     "--config.llava_dir=.../llava-v1.6-vicuna-7b-hf --config.llava_adapter=DIR (the MultiMask "
                     "adapter, promptgen_train's export/adapter) for real ones")
    for note in notes:
      log(note)
    painter = cls(models, params, load_clip_tokenizer(model_dir), writer, dtype=dtype, attention=attention,
                  seed=seed, notes=notes, **options)
    painter.load_seconds = time.perf_counter() - t0
    return painter

  @classmethod
  def from_config(cls, config, workdir: str, load_prompt_writer: bool = True, **kwargs) -> "Painter":
    """From a paint / paint_app config (configs/paint.py, configs/app.py)."""
    return cls.load(model_dir=config.model_dir, llava_dir=config.llava_dir, llava_adapter=config.llava_adapter,
                    llava_quantize=config.llava_quantize, llava_kv_cache=config.llava_kv_cache,
                    workdir=workdir, lora=config.lora,
                    load_prompt_writer=load_prompt_writer, prompt_max_new_tokens=config.prompt_max_new_tokens,
                    dtype=config.dtype, attention=config.attention, seed=config.seed,
                    resolution=config.resolution, max_concepts=config.max_concepts,
                    num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    scheduler=config.scheduler, max_pixels=config.max_pixels, **kwargs)

  # ---------------------------------------------------------------------------------------------------------------

  def check(self, image: Image.Image, masks: Sequence[Mask], prompts=None) -> list[Mask]:
    return check_inputs(image, masks, self.max_concepts, self.max_pixels, prompts)

  def crop(self, image: Image.Image, masks: Sequence[Mask], prompts: Optional[Sequence[str]] = None):
    """The dataset's example for these inputs (resize + centre crop, packed prompts, RCA regions) and the masks
    cropped; InputError for a mask that the crop leaves empty."""
    names = [m.color for m in masks]  # Colours are unique: the example's mask keys.
    texts = list(prompts) if prompts is not None else ["" for _ in masks]
    example = make_inpainting_example(image, {n: {"caption": t} for n, t in zip(names, texts)},
                                      {m.color: m.pixels for m in masks}, self.tokenizer, self.data_config,
                                      np.random.default_rng(0), selection=names)
    cropped = [Mask(m.name, m.color, (example["masks"][i] * 255).astype(np.uint8)) for i, m in enumerate(masks)]
    for m in cropped:
      if not m.pixels.any():
        raise InputError(f"mask {m.name!r} ({m.color}) lies outside the centre square the painter uses (shorter "
                         f"side scaled to {self.resolution} px, then cropped): nothing of it would be painted")
    return example, cropped

  def write_prompts(self, image: Image.Image, masks: Sequence[Mask]) -> tuple[list[str], list[str], str]:
    """(one prompt per mask, the colours the answer had no complete <c>...</c> for, the whole answer). Those
    colours get the answer with its colour tags removed (what a random model writes is still shown; a real one
    rarely misses a colour), "" if nothing is left: the command then stops, the app leaves the box to the person."""
    if self.prompt_writer is None:
      raise RuntimeError("this Painter was built without the prompt generator (load_prompt_writer=False)")
    masks = self.check(image, masks)
    example, cropped = self.crop(image, masks)
    from idmp_jax.tasks.promptgen_generate import to_uint8
    with _LOCK:
      prompts, answer = self.prompt_writer(to_uint8(example["pixel_values"]), [m.pixels for m in cropped],
                                           [m.color for m in cropped])
    untagged = " ".join(re.sub(r"</?[A-Za-z]+>", " ", answer).split())[:300]
    missing = [m.color for m, p in zip(masks, prompts) if not p]
    return [p or untagged for p in prompts], missing, answer

  def _sampler(self, steps: int, scheduler: str, cfg: bool):
    if scheduler not in SCHEDULERS:
      raise InputError(f"scheduler {scheduler!r}: choose one of {list(SCHEDULERS)} ('' = the model's own)")
    if not 1 <= steps <= 1000:
      raise InputError(f"steps = {steps}: must be in 1..1000")
    sched_config = {k: v for k, v in self.models.scheduler_config.items() if k != "_source"}
    key = (self.models.unet, self.models.vae, self.models.text, json.dumps(sched_config, sort_keys=True),
           int(steps), scheduler, bool(cfg), self.dtype, self.attention)
    if key not in _SAMPLERS:
      options = sampling.SamplerOptions(num_inference_steps=int(steps), guidance_scale=7.5 if cfg else 1.0,
                                        scheduler=scheduler, dtype=self.dtype, attention_impl=self.attention)
      calls = len(schedulers.from_config(self.models.scheduler_config, int(steps), scheduler or None).timesteps)
      _SAMPLERS[key] = (jax.jit(sampling.make_sample_fn(self.models, options, on_step=_count_unet_call)), calls)
    return _SAMPLERS[key]

  def paint(self, image: Image.Image, masks: Sequence[Mask], prompts: Sequence[str], *, steps: int | None = None,
            guidance: float | None = None, seed: int | None = None, scheduler: str | None = None,
            on_progress: Optional[Callable[[int, int], None]] = None) -> Painting:
    """Paints every mask at once with its prompt. `on_progress(done, total)` is called from this thread while
    the compiled sampler runs (it polls the count of UNet calls the sampler reports)."""
    steps = self.defaults["steps"] if steps is None else int(steps)
    guidance = self.defaults["guidance"] if guidance is None else float(guidance)
    scheduler = self.defaults["scheduler"] if scheduler is None else scheduler
    seed = self.seed if seed is None else int(seed)
    prompts = [p.strip() for p in prompts]
    masks = self.check(image, masks, prompts)
    example, cropped = self.crop(image, masks, prompts)
    fn, total = self._sampler(steps, scheduler, guidance > 1.0)
    batch = {k: example[k][None] for k in ("pixel_values", "mask", "input_ids", "token_region", "region_masks")}
    batch["uncond_ids"] = self.uncond_ids
    batch["guidance_scale"] = np.float32(guidance)
    latent_shape = (self.resolution // self.models.vae.downscale,) * 2 + (self.models.vae.latent_channels,)
    noise, posterior = sampling.draw_noise(sampling.example_key(seed, "paint")[None], latent_shape)
    with _LOCK:
      _UNET_CALLS[0] = 0
      t0 = time.perf_counter()
      out = fn(self.params, batch, noise, posterior)  # Dispatched asynchronously: progress is polled below.
      reported = -1
      while on_progress is not None and not out.is_ready() and _UNET_CALLS[0] < total:
        if _UNET_CALLS[0] != reported:
          reported = _UNET_CALLS[0]
          on_progress(reported, total)
        time.sleep(0.01)  # After the last UNet call only the VAE decode is left: block on it below.
      result = np.asarray(out)[0]
      seconds = time.perf_counter() - t0
    if on_progress is not None:
      on_progress(total, total)
    return Painting(image=result, input=example["pixel_values"] / 2 + 0.5, masks=cropped, prompts=prompts,
                    seconds=seconds)

  def warm_up(self, write_prompts: bool = True) -> float:
    """Compiles the default settings on a dummy input (what the app does at start-up); returns the seconds."""
    t0 = time.perf_counter()
    size = self.resolution
    image = Image.new("RGB", (size, size), (120, 110, 100))
    pixels = np.zeros((size, size), np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = 255
    masks = [Mask("warm-up", "red", pixels)]
    if write_prompts and self.prompt_writer is not None:
      self.write_prompts(image, masks)
    self.paint(image, masks, ["warm-up"])
    return time.perf_counter() - t0
