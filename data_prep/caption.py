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

The captioner is any callable (images: list[PIL.Image], prompts: list[str]) -> list[str]. The default,
`TransformersLlavaCaptioner`, is the original's: transformers LLaVA-NeXT (llava-v1.6-vicuna-13b), 4-bit NF4 with
fp16 compute when CUDA and bitsandbytes are present (else fp16 on GPU, fp32 on CPU), left padding, max 40 new
tokens, stop string ".". (idmp_jax's own JAX LLaVA can replace it once it exists: same callable.)
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

  def __call__(self, images, prompts):
    inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt").to(self.model.device)
    ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, stop_strings=".",
                              tokenizer=self.processor.tokenizer)
    texts = self.processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [answer_of(t) for t in texts]


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
