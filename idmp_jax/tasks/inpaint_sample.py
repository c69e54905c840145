"""Test-split generation for every inpainting variant of the paper (HQPrompt, Inp, RCA, FineTuned,
RCA-FineTuned, RCA-FineTuned-Gen): one PNG per stem, plus what evaluation needs.

Writes under workdir:
  images/<stem>.png            the painting, 8 bits (round(x * 255)), the full decoded image (SPEC §6)
  reference/<stem>.png         the ground truth after the dataset's resize/crop (with `write_reference`)
  masks/<stem>/<mask_k>.png    the kept masks at the output resolution, in order (with `write_reference`)
  manifest.json                stem -> {"masks": [kept mask names in order], "captions": [ground truth],
                               "prompts": [texts the model saw], "num_masks": k}
Resumable: a stem whose PNG exists is skipped (PNGs are written whole: temporary file, then rename). Everything that
can be checked without compute (model folders, LoRA file, image/mask files and sizes, generated prompt files) is
checked first, and every problem is reported with its path.
"""
from __future__ import annotations

import concurrent.futures
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from idmp_jax import parallel, sampling
from idmp_jax.data import files
from idmp_jax.data.arrayrecord import data_source_path, make_inpainting_source
from idmp_jax.data.inpainting import InpaintingConfig, InpaintingSource
from idmp_jax.data.tokenizer import load_clip_tokenizer


def default_config() -> ml_collections.ConfigDict:
  """The paper's sampling settings (SPEC §6); variant configs override a few fields."""
  c = ml_collections.ConfigDict()
  c.task = "inpaint_sample"
  c.name = "inpaint_sample"
  c.seed = 42
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dtype = "bfloat16"            # Compute dtype (the original ran fp16).
  c.attention = "auto"
  c.model_dir = ""                # stable-diffusion-2-inpainting folder; "tiny": a tiny random one in workdir.
  c.lora = ""                     # LoRA (pytorch_lora_weights.safetensors or its folder) for fine-tuned variants.
  c.lora_scale = 1.0
  c.data_dir = ""                 # mm_inp_dataset root; "demo": build the demo dataset in workdir.
  c.data_format = "folder"        # "folder": data_dir | "array_record": array_record_dir (same examples).
  c.array_record_dir = ""         # `python -m data_prep build-tfds --out=DIR`: DIR or its version folder.
  c.split = "test"
  c.max_images = 0                # 0: the whole split.
  c.rca = True
  c.fixed_prompt = ""             # HQPrompt: this text for every image (no packing, no periods), RCA off.
  c.prompts_dir = ""              # -Gen: generated prompts, <stem>.json lists in mask order.
  c.selection = ""                # Optional manifest stem -> kept mask names (replays a selection made elsewhere).
  c.resolution = 512
  c.max_concepts = 5
  c.masked_area_threshold = 0.65
  c.batch_size = 8
  c.num_inference_steps = 50
  c.guidance_scale = 7.5
  c.scheduler = ""                # "" = the folder's (PNDM); or ddim | pndm | dpm++.
  c.write_reference = True
  c.num_workers = 8               # Threads reading and preparing examples.
  return c


def _prepare_inputs(config, workdir):
  model_dir = config.model_dir
  if model_dir == "tiny":
    from idmp_jax import tiny
    model_dir = tiny.make_tiny_pipeline(os.path.join(workdir, "tiny_pipeline"), seed=config.seed)
  data_dir = config.data_dir
  if data_dir == "demo" and config.get("data_format", "folder") == "folder":
    from data_prep.demo import make_demo_dataset
    root = os.path.join(workdir, "demo_data", "mm_inp_dataset")
    data_dir = root if os.path.isdir(root) else make_demo_dataset(os.path.join(workdir, "demo_data"))
  data_source_path(config, data_dir)  # A bad data_format, data_dir or array_record_dir, named before compute.
  if config.lora and not os.path.exists(config.lora):
    raise FileNotFoundError(f"config.lora = {config.lora!r}: LoRA checkpoint not found")
  if config.fixed_prompt and (config.rca or config.prompts_dir):
    raise ValueError("config.fixed_prompt (HQPrompt) goes without RCA and without prompts_dir")
  return model_dir, data_dir


def _check_examples(source, stems, prompts_dir: str):
  """Every problem with the inputs of these stems, before any compute. The files of a folder source are checked
  here; an ArrayRecord build holds only records that decoded when it was built (it reports and leaves out the
  others), so only the generated prompts are left to check."""
  problems = []
  for stem in stems:
    if isinstance(source, InpaintingSource):
      problems += [str(p) for p in files.validate_example(source.layout, source.split, stem, ("caption",),
                                                          check_entities=False)]
    if prompts_dir:
      path = os.path.join(prompts_dir, f"{stem}.json")
      try:
        with open(path) as f:
          prompts = json.load(f)
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
          problems.append(f"{path}: expected a non-empty JSON list of prompt strings, got {prompts!r:.80}")
      except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{path}: unreadable generated prompts ({e})")
  if problems:
    shown = "\n  ".join(problems[:30])
    raise ValueError(f"{len(problems)} problem(s) in the inputs:\n  {shown}")


def _write_png(array01: np.ndarray, path: str) -> None:
  tmp = path + ".tmp.png"
  Image.fromarray(np.round(array01 * 255).astype(np.uint8)).save(tmp)
  os.replace(tmp, path)


def run(config, workdir: str, mesh) -> dict:
  model_dir, data_dir = _prepare_inputs(config, workdir)
  models, params = sampling.load_models(model_dir, lora=config.lora, lora_scale=config.lora_scale)
  tokenizer = load_clip_tokenizer(model_dir)
  data_config = InpaintingConfig(resolution=config.resolution, max_concepts=config.max_concepts,
                                 masked_area_threshold=config.masked_area_threshold, shuffle_concepts=True,
                                 drop_caption_probability=0.0, rca=config.rca, extras=True)
  source = make_inpainting_source(config, config.split, tokenizer, data_config, data_dir=data_dir, seed=config.seed,
                                  prompts_dir=config.prompts_dir or None, selection=config.selection or None)
  index_of = {s: i for i, s in enumerate(source.stems)}
  stems = source.stems[:config.max_images] if config.max_images else list(source.stems)
  if not stems:
    raise ValueError(f"{getattr(source, 'build_dir', data_dir)}: split {config.split!r} has no annotated images")
  out_dir = os.path.join(workdir, "images")
  todo = [s for s in stems if not os.path.exists(os.path.join(out_dir, f"{s}.png"))]
  _check_examples(source, todo, config.prompts_dir)
  logging.info("%d images in split %s, %d already written, %d to paint", len(stems), config.split,
               len(stems) - len(todo), len(todo))

  dtype = jnp.dtype(config.dtype)
  params = jax.device_put(sampling.cast_params(params, dtype), parallel.replicated(mesh))
  options = sampling.SamplerOptions(num_inference_steps=config.num_inference_steps,
                                    guidance_scale=config.guidance_scale, scheduler=config.scheduler, dtype=dtype,
                                    attention_impl=config.attention)
  sample_fn = sampling.make_sample_fn(models, options)
  latent_shape = (config.resolution // models.vae.downscale,) * 2 + (models.vae.latent_channels,)

  @jax.jit
  def paint(params, batch, key_data):
    noise, posterior = sampling.draw_noise(jax.random.wrap_key_data(key_data), latent_shape)
    return sample_fn(params, batch, noise, posterior)

  uncond_ids = tokenizer([""])[0]
  fixed_ids = tokenizer([config.fixed_prompt])[0] if config.fixed_prompt else None
  keys = ["pixel_values", "mask", "input_ids"] + (["token_region", "region_masks"] if config.rca else [])
  batch_size, nproc, pid = config.batch_size, jax.process_count(), jax.process_index()
  local = parallel.batch_size_per_process(batch_size, mesh)
  manifest_path = os.path.join(workdir, "manifest.json")
  manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
  for sub in ("images", "reference", "masks"):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)

  pool = concurrent.futures.ThreadPoolExecutor(config.num_workers)
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  for group in tqdm(batches, desc=f"painting {config.name}", unit="batch", disable=pid != 0):
    padded = group + [group[-1]] * (batch_size - len(group))  # Same shapes every batch: one compilation.
    mine = padded[pid * local:(pid + 1) * local]
    examples = list(pool.map(lambda s: source.example(index_of[s]), mine))
    batch = {k: np.stack([e[k] for e in examples]) for k in keys}
    if fixed_ids is not None:
      batch["input_ids"] = np.broadcast_to(fixed_ids, batch["input_ids"].shape).copy()
    key_data = np.stack([np.asarray(jax.random.key_data(sampling.example_key(config.seed, s))) for s in mine])
    batch = parallel.shard_batch(dict(batch, key_data=key_data), mesh)
    key_data = batch.pop("key_data")
    batch["uncond_ids"] = jnp.asarray(uncond_ids)
    images = paint(params, batch, key_data)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    if pid != 0:
      continue
    for stem, image, example in zip(padded[:len(group)], images, _all_examples(examples, group, source, index_of,
                                                                               pid, local, pool)):
      _write_png(image, os.path.join(out_dir, f"{stem}.png"))
      manifest[stem] = dict(masks=list(example["mask_names"]), captions=list(example["captions"]),
                            prompts=[config.fixed_prompt] if config.fixed_prompt else list(example["texts"]),
                            num_masks=int(example["num_masks"]))
      if config.write_reference:
        _write_png(example["pixel_values"] / 2 + 0.5, os.path.join(workdir, "reference", f"{stem}.png"))
        os.makedirs(os.path.join(workdir, "masks", stem), exist_ok=True)
        for name, m in zip(example["mask_names"], example["masks"]):
          _write_png(m, os.path.join(workdir, "masks", stem, f"{name}.png"))
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, manifest_path)  # After the PNGs: the manifest never names an image that is not there.
  pool.shutdown()
  summary = dict(images=len(stems), painted=len(todo), out_dir=out_dir, model_dir=model_dir,
                 data_dir=getattr(source, "build_dir", data_dir))  # the folder read: the dataset or the build
  if pid == 0:
    print(f"{config.name}: {len(todo)} painted, {len(stems) - len(todo)} already there -> {out_dir} "
          f"(manifest: {manifest_path})")
  return summary


def _all_examples(local_examples, group, source, index_of, pid, local, pool):
  """Process 0 writes every image of the batch: its own examples, and the others' rebuilt (cheap, deterministic)."""
  if jax.process_count() == 1:
    return local_examples[:len(group)]
  return list(pool.map(lambda s: source.example(index_of[s]), group))
