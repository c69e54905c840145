"""Paint one picture: image + masks (+ prompts, or the prompt generator) -> RCA painting of all masks at once.

  python -m idmp_jax.main --config=configs/paint.py --config.image=PATH --config.masks=M1.png,M2.png
  python -m idmp_jax.main --config=configs/paint.py --config.image=PATH --config.masks=M1.png,M2.png \
      --config.prompts="a red boat|a stormy sky"                       # prompts by hand: no generator
  python -m idmp_jax.main --config=configs/paint.py --config.stem=NAME --config.data_dir=...  # a dataset example

With no prompts, the MultiMask prompt generator (`config.llava_dir`, LLaVA-NeXT) writes one per mask, asked about
each mask by its colour (mask i gets colour i of SPEC §8's list: red, green, blue, yellow, cyan). Masks keep the
order given (prompt i paints mask i); a pixel covered by several masks listens to each of their prompts (RCA's
rule, SPEC §3); pixels outside every mask listen to all prompts. The workdir gets `painting.png`, `prompts.json`
(mask file, colour, prompt) and `grid.png` (input with coloured masks, prompts under it, result). The default
models are tiny random ones built in the workdir (no downloads): the painting is noise and the prompts random text.
The work is done by `idmp_jax.painter.Painter`, which the web app (`paint_app`) shares.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from idmp_jax import painter as painter_lib
from idmp_jax.data import files
from idmp_jax.data.llava import COLORS
from idmp_jax.painter import MAX_PIXELS, InputError, Mask


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "paint"
  c.name = "paint"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # One painting: one device.
  c.dtype = "bfloat16"
  c.attention = "auto"
  c.model_dir = "tiny"        # SD-2 inpainting folder; "tiny" builds a tiny random one (the painting is noise).
  c.lora = ""
  c.llava_dir = "tiny"        # MultiMask LLaVA-NeXT folder (llava-v1.6-vicuna-7b-hf layout) that writes the prompts;
                              # "tiny" builds a tiny random one (the prompts are random text).
  c.llava_adapter = ""        # The MultiMask peft adapter (promptgen_train's export/adapter), merged at load.
  c.llava_quantize = ""       # "int8" | "int4": the generator's decoder weights quantised after the merge (its
                              # language model in 7.0 / ~4 GB instead of 13.5 in bf16: room beside SD-2); lossy.
  c.llava_kv_cache = ""       # "int8": the generator's KV cache in int8 (lossy).
  c.prompt_max_new_tokens = 128  # The answer stops at </red> (asked last) well before this on a trained model.
  c.image = ""                # The painting to fill in.
  c.masks = ""                # Comma-separated mask PNGs (white = paint here), same size as the image.
  c.prompts = ""              # "|"-separated, one per mask; empty: the prompt generator writes them.
  c.stem = ""                 # Instead of image/masks: an example of the dataset (first masks by area).
  c.captions = False          # With stem and no prompts: paint with the dataset's captions instead of generating.
  c.data_dir = ""
  c.split = "test"
  c.max_concepts = 5
  c.max_pixels = MAX_PIXELS   # Larger images are refused (the limit is stated in the message).
  c.resolution = 512
  c.num_inference_steps = 50
  c.guidance_scale = 7.5
  c.scheduler = ""            # "" = the folder's (SD-2: PNDM) | pndm | ddim | dpm++.
  return c


def _split_prompts(text: str) -> list[str]:
  return [p.strip() for p in text.split("|")]


def _read_inputs(config):
  """(image, [Mask], prompts or None), every problem named by file."""
  if config.stem:
    layout = files.Layout(config.data_dir)
    image, anns, masks = files.read_example(layout, config.split, config.stem, ("caption",))
    names = sorted(anns, key=lambda n: -int(masks[n].astype(np.int64).sum()))[:config.max_concepts]
    prompts = _split_prompts(config.prompts) if config.prompts else (
        [anns[n]["caption"] for n in names] if config.captions else None)
    return image, [Mask(n, c, masks[n]) for n, c in zip(names, COLORS)], prompts
  if not config.image:
    raise ValueError("config.image is empty: give an image (and config.masks), or config.stem")
  image = files.read_image(config.image)
  if image.width * image.height > config.max_pixels:
    raise ValueError(f"{config.image}: {image.width}x{image.height} is larger than the limit of "
                     f"{config.max_pixels} pixels (config.max_pixels)")
  mask_paths = [m for m in config.masks.split(",") if m]
  if not mask_paths:
    raise ValueError("config.masks is empty: give at least one mask PNG")
  if len(mask_paths) > config.max_concepts:
    raise ValueError(f"config.masks: {len(mask_paths)} masks, at most config.max_concepts = {config.max_concepts}")
  masks = []
  for path, color in zip(mask_paths, COLORS):
    m = files.read_mask(path, image.size)  # Raises naming the file on a size mismatch or a bad file.
    if not painter_lib.binarize(m).any():
      raise ValueError(f"{path}: the mask is empty (no pixel >= 128)")
    masks.append(Mask(os.path.splitext(os.path.basename(path))[0], color, m))
  prompts = None
  if config.prompts:
    prompts = _split_prompts(config.prompts)
    if len(prompts) != len(masks) or not all(prompts):
      raise ValueError(f"config.prompts: {len(prompts)} prompt(s) for {len(masks)} mask(s), none may be empty")
  return image, masks, prompts


def run(config, workdir: str, mesh) -> dict:
  del mesh  # One painting runs on the default device.
  image, masks, prompts = _read_inputs(config)
  try:
    masks = painter_lib.check_inputs(image, masks, config.max_concepts, config.max_pixels, prompts)
  except InputError as e:
    raise ValueError(f"{config.image or config.stem}: {e}") from None
  painter = painter_lib.Painter.from_config(config, workdir, load_prompt_writer=prompts is None)
  if prompts is None:
    prompts, missing, answer = painter.write_prompts(image, masks)
    if missing:
      print(f"the prompt generator wrote no <c>...</c> region for {missing}; using its answer without tags: "
            f"{answer!r}")
    empty = [m.color for m, p in zip(masks, prompts) if not p]
    if empty:
      raise ValueError(f"the prompt generator wrote nothing for the {empty} mask(s) (answer {answer!r}): give "
                       "the prompts with --config.prompts='a|b|...'")
    for m, p in zip(masks, prompts):
      print(f"prompt {m.color} ({m.name}): {p}")
  painting = painter.paint(image, masks, prompts)
  paths = painter_lib.save_outputs(painting, workdir)
  print(f"painted {len(masks)} mask(s) -> {paths['painting']}, prompts.json, grid.png")
  for note in painter.notes:
    print(note)
  return dict(painting=paths["painting"], prompts=painting.record(), notes=list(painter.notes))
