"""caption-masks: a LLaVA caption for every entity crop (SPEC §11), resumable and shardable.

Work: the sorted folders of entities/, process `p` of `n` takes folder i when i % n == p (the original's rule);
within them every mask of annotations.json in file order, batched across folders. Prompt (per crop):
  "...USER: <image>\\nWhat are the details of this image containing {concept} in a short sentence? Ignore the
  painting style. ASSISTANT: The image shows"
and the stored caption is the decoded text after "ASSISTANT: " (so it starts "The image shows ...").

Progress file: `<backup_dir>/backup_{process_id}.json`, the original's schema ({stem: {mask: caption}, "steps":
batches done}), rewritten atomically every `save_every` batches. Unlike the original, a re-run RESUMES from it
(captions already there are not recomputed), and the final `backup_{process_id}_final.json` is written at the end
(a re-run after it does nothing). The original's last partial batch cut captions by the prompt's length, which
does not match the decoded text (quirk, not reproduced: every batch uses "ASSISTANT: ").

The captioner is any callable (images: list[PIL.Image], prompts: list[str]) -> list[str]. Two are here, with the
original's decoding (greedy, left padding, max 40 new tokens, stop after EOS or at the first new token holding
"."): at the same precision they give the same greedy tokens and captions for the same model folder (tested in
fp32 on a tiny random model); at the defaults below the weights differ (bf16 vs 4-bit NF4), and so may wording.
  JaxLlavaCaptioner            the default: idmp_jax's LLaVA-NeXT (any llava-hf llava-v1.6 folder, e.g. the
                               original's llava-v1.6-vicuna-13b-hf) in bf16 on an accelerator, fp32 on CPU. One
                               device per process: shard over the devices with --num-processes/--process-id.
  TransformersLlavaCaptioner   `--backend=transformers`, the original's own: transformers LLaVA-NeXT, 4-bit NF4
                               with fp16 compute when CUDA and bitsandbytes are present (else fp16 on GPU, fp32 on
                               CPU).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

from PIL import Image
from tqdm import tqdm

from data_prep import common

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


def caption_prompt(concept: str) -> str:
  return (f"{SYSTEM} USER: <image>\nWhat are the details of this image containing {concept} in a short sentence? "
          "Ignore the painting style. ASSISTANT: The image shows")


def answer_of(decoded: str) -> str:
  keyword = "ASSISTANT: "
  i = decoded.find(keyword)
  return decoded[i + len(keyword):] if i >= 0 else decoded


class TransformersLlavaCaptioner:

  def __init__(self, model_id: str, max_new_tokens: int = 40):
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    self.max_new_tokens = max_new_tokens
    self.processor = AutoProcessor.from_pretrained(model_id)
    self.processor.tokenizer.padding_side = "left"
    kwargs = {}
    if torch.cuda.is_available():
      try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float16)
      except ImportError:
        kwargs["dtype"] = torch.float16
      kwargs["device_map"] = "auto"
    self.model = LlavaNextForConditionalGeneration.from_pretrained(model_id, **kwargs)

  def generate(self, images, prompts):
    """(B, prompt + new) token ids, as transformers' generate returns them (finished rows padded)."""
    inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt").to(self.model.device)
    return self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, stop_strings=".",
                               tokenizer=self.processor.tokenizer)

  def __call__(self, images, prompts):
    texts = self.processor.batch_decode(self.generate(images, prompts), skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
    return [answer_of(t) for t in texts]


class JaxLlavaCaptioner:
  """Captions with idmp_jax's LLaVA-NeXT (models/llava_next.py, models/generation.py) from a stock llava-hf folder.

  Inputs are built as promptgen_generate builds them (its tokenizer and `make_batch`: the NumPy image processor,
  image-token expansion, left padding), in bucketed shapes, and a short last batch is padded with copies of its
  last row, so a process compiles once per bucket rather than once per batch. The caption is what the
  transformers captioner returns: the prompt and the new tokens (up to EOS or the first one holding the stop
  string, kept) decoded together, special tokens skipped, cut after "ASSISTANT: "."""

  def __init__(self, model_dir: str, max_new_tokens: int = 40, *, dtype: str | None = None,
               stop_string: str = ".", length_bucket: int = 64, chunk_size: int = 8):
    import jax
    import jax.numpy as jnp
    from idmp_jax.data import llava_processor as lp
    from idmp_jax.models import generation
    from idmp_jax.models import llava_next as ln
    from idmp_jax.tasks import promptgen_generate as pg
    if not model_dir or not os.path.isdir(model_dir):
      raise FileNotFoundError(f"--model-id {model_dir!r}: the JAX backend reads a local llava-hf model folder "
                              "(download it first, or use --backend=transformers for hub ids)")
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
      if not os.path.isfile(os.path.join(model_dir, name)):
        raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing from the LLaVA-NeXT model folder")
    dtype = jnp.dtype(dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    self.make_batch = pg.make_batch
    self.tokenizer = pg.LlavaTokenizer(model_dir)
    self.proc_config = lp.ImageProcessorConfig.load(model_dir)
    self.model_config, params = ln.load_pretrained(model_dir, dtype=dtype)  # cast on the host
    self.params = jax.device_put(params)
    self.stop_string, self.length_bucket, self.rows = stop_string, length_bucket, 0
    eos = tuple(sorted({self.tokenizer.eos_id, *self.model_config.text_config.eos_token_id} - {None}))
    pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    model = ln.LlavaNextForConditionalGeneration(self.model_config, dtype=dtype)
    self.generator = generation.Generator(model, generation.GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, chunk_size=chunk_size))

  def generate(self, images, prompts):
    """(input_ids (B, T) of the prompts, new tokens (B, max_new_tokens), their lengths), B = len(images)."""
    n = len(images)
    self.rows = max(self.rows, n)  # later, shorter batches take the first batch's shape
    examples = [{"image": im, "question": q} for im, q in zip(images, prompts)]
    examples += [examples[-1]] * (self.rows - n)
    inputs = self.make_batch(examples, self.tokenizer, self.proc_config, self.model_config, self.length_bucket)
    tokens, lengths = self.generator(self.params, inputs, stop_strings=(self.stop_string,),
                                     decode_fn=self.tokenizer.decode)
    return inputs["input_ids"][:n], tokens[:n], lengths[:n]

  def __call__(self, images, prompts):
    ids, tokens, lengths = self.generate(images, prompts)
    return [answer_of(self.tokenizer.decode(list(p) + list(t[:k]))) for p, t, k in zip(ids, tokens, lengths)]


def progress_paths(backup_dir, process_id: int) -> tuple[str, str]:
  return (os.path.join(backup_dir, f"backup_{process_id}.json"),
          os.path.join(backup_dir, f"backup_{process_id}_final.json"))


def work_items(entities_dir, num_processes: int, process_id: int) -> list[tuple[str, str, str]]:
  """(stem, mask name, concept) of this process, in the original's order."""
  stems = sorted(f for f in os.listdir(entities_dir) if os.path.isdir(os.path.join(entities_dir, f)))
  items = []
  for i, stem in enumerate(stems):
    if i % num_processes != process_id:
      continue
    path = os.path.join(entities_dir, stem, "annotations.json")
    if not os.path.exists(path):
      continue
    for mask_name, entry in common.read_json(path).items():
      items.append((stem, mask_name, entry["concept"]))
  return items


def caption_masks(entities_dir, captioner: Callable, batch_size: int = 8, num_processes: int = 1,
                  process_id: int = 0, backup_dir=".", save_every: int = 100) -> int:
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
  os.makedirs(backup_dir, exist_ok=True)
  progress_path, final_path = progress_paths(backup_dir, process_id)
  done: dict = {}
  for path in (progress_path, final_path):
    if os.path.exists(path):
      for stem, captions in common.read_json(path).items():
        if stem != "steps":
          done.setdefault(stem, {}).update(captions)
  steps = 0
  if os.path.exists(progress_path):
    steps = int(common.read_json(progress_path).get("steps", 0))
  items = [it for it in work_items(entities_dir, num_processes, process_id) if it[1] not in done.get(it[0], {})]
  print(f"caption-masks: process {process_id}/{num_processes}: {len(items)} masks to caption "
        f"({sum(len(v) for v in done.values())} already done)")

  def save(path):
    common.atomic_write_json(path, {**done, "steps": steps})

  with tqdm(total=math.ceil(len(items) / batch_size), desc="caption-masks", file=sys.stdout, disable=None) as bar:
    for start in range(0, len(items), batch_size):
      batch = items[start:start + batch_size]
      images = []
      for stem, mask_name, _ in batch:
        with Image.open(os.path.join(entities_dir, stem, f"{mask_name}.png")) as im:
          images.append(im.convert("RGB"))
      captions = captioner(images, [caption_prompt(concept) for _, _, concept in batch])
      if len(captions) != len(batch):
        raise RuntimeError(f"captioner returned {len(captions)} captions for {len(batch)} images")
      for (stem, mask_name, _), caption in zip(batch, captions):
        done.setdefault(stem, {})[mask_name] = caption
      steps += 1
      bar.update(1)
      if steps % save_every == 0:
        save(progress_path)
  save(progress_path)
  save(final_path)
  return 0
