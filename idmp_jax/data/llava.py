"""The prompt-generation example (SPEC §8), as the original `LlavaDataset.__getitem__`, at the original size.

`make_llava_example` returns:
  image             (H, W, 3) uint8   the painted image (masks drawn in solid colour, survivors in area order)
  question          str               the conversation up to "ASSISTANT:" (what the model is given at test)
  target            str               "<c>caption</c>..." in target order, no spaces, no EOS
  prompt            str               question + " " + target (the training text)
  colors            list[str]         colour keys in target order ("gray" in gray mode)
  mask_names, captions, concepts, noun_chunk_roots   lists in target order
  entity_paths      list[str]         entities/<stem>/<mask>.png in target order (CLIPSim crops)
  stem, image_size  str, (H, W)
Tokenisation and LLaVA image processing are NOT done here: pass a callable (`transform` of the loader, written
with the LLaVA processor) that maps this dict to model inputs.

Randomness: one generator per example (`inpainting.example_rng`); draws in the original's order: colour
permutation, shuffle, the red draw (only when the red check fires), second shuffle.

Quirk (§8.4), reproduced by default: at val/test the "is any entity red?" check looks at the colours of the
`to_keep` largest entities in pre-shuffle order, not at the survivors, so an example can end with two red regions
or none. `red_check_survivors=True` checks the survivors instead.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image

from idmp_jax.data import files
from idmp_jax.data.inpainting import example_rng, threshold_count

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "orange": (255, 165, 0), "purple": (128, 0, 128),
    "pink": (255, 192, 203), "brown": (165, 42, 42),
}
GRAY = (128, 128, 128)
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
ZERO_SHOT_QUESTION = (f"{SYSTEM} USER: <image>\nWrite 1 text prompt that describes a reasonable object to be "
                      "inserted in the gray area. ASSISTANT:")


def multimask_question(colors: Sequence[str]) -> str:
  return (f"{SYSTEM} USER: <image>\nDiscover and describe the objects hidden behind the masks of the colors: "
          f"{', '.join(colors)}. ASSISTANT:")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """Options of the original LlavaDataset. `split` in ("val", "test") turns on the red check and red-last order.
  `question`: "multimask" (the trained template) or "zero_shot" (LLaVA-Prompt, §8.10)."""
  split: str = "train"
  max_concepts: int = 5
  masked_area_threshold: float | None = 0.65
  shuffle_concepts: bool = True
  only_gray_concept: bool = False
  override_gray: bool = False
  remove_intersections: bool = False
  red_check_survivors: bool = False  # the fix of the §8.4 quirk
  alpha: float = 1.0                 # mask opacity; every original config uses 1.0 (solid)
  question: str = "multimask"

  def __post_init__(self):
    if self.split not in files.SPLITS:
      raise ValueError(f"split must be one of {files.SPLITS}, got {self.split!r}")
    if not 1 <= self.max_concepts <= len(COLORS):
      raise ValueError(f"max_concepts must be in 1..{len(COLORS)}, got {self.max_concepts}")
    if self.question not in ("multimask", "zero_shot"):
      raise ValueError(f"question must be 'multimask' or 'zero_shot', got {self.question!r}")


def draw_mask(image: np.ndarray, mask: np.ndarray, color, alpha: float) -> np.ndarray:
  """torchvision 0.19 draw_segmentation_masks for one mask: colour where mask != 0, blended in float32 with
  `alpha`, truncated to uint8 (exact copy of the colour at alpha 1)."""
  drawn = image.copy()
  drawn[mask != 0] = np.asarray(color, np.uint8)
  if alpha == 1.0:
    return drawn
  out = image.astype(np.float32) * np.float32(1 - alpha) + drawn.astype(np.float32) * np.float32(alpha)
  return out.astype(np.uint8)


def make_llava_example(image: Image.Image, annotations: Mapping[str, dict], masks: Mapping[str, np.ndarray],
                       config: LlavaConfig, rng: np.random.Generator, *, stem: str = "",
                       layout: files.Layout | None = None) -> dict:
  """One example from an RGB image, its annotations (file order) and uint8 masks (original size)."""
  names = list(annotations)
  areas = {n: int(masks[n].sum(dtype=np.int64)) for n in names}
  by_area = lambda seq: sorted(seq, key=lambda e: areas[e["name"]], reverse=True)  # stable, largest first
  ents = by_area([{"name": n, "mask": masks[n].astype(np.float32) / np.float32(255.0)} for n in names])
  ents = ents[:config.max_concepts]

  color_keys = list(COLORS)[:config.max_concepts]
  perm = rng.permutation(len(color_keys))[:len(ents)]
  sampled = []
  for e, p in zip(ents, perm):
    e["key"] = color_keys[p]
    e["color"] = COLORS[e["key"]]
    sampled.append(e["key"])

  if config.shuffle_concepts:
    ents = [ents[i] for i in rng.permutation(len(ents))]
  if config.masked_area_threshold is not None:
    keep = threshold_count([e["mask"] for e in ents], config.masked_area_threshold)
    ents, sampled = ents[:keep], sampled[:keep]
    ents = by_area(ents)

  checked = [e["key"] for e in ents] if config.red_check_survivors else sampled
  if config.split in ("val", "test") and "red" not in checked:
    r = int(rng.integers(0, len(ents)))
    ents[r]["key"], ents[r]["color"] = "red", COLORS["red"]

  if config.only_gray_concept:
    if config.split in ("val", "test"):
      for e in ents:
        if e["key"] == "red":
          e["key"], e["color"] = "gray", ((255, 0, 0) if config.override_gray else GRAY)
    else:
      ents[0]["key"], ents[0]["color"] = "gray", GRAY

  if config.remove_intersections:
    for i in range(len(ents)):
      for later in ents[i + 1:]:
        ents[i]["mask"] = ents[i]["mask"] * (1 - later["mask"])

  painted = np.array(image, dtype=np.uint8)
  for e in ents:
    if config.only_gray_concept and e["key"] != "gray":
      continue
    painted = draw_mask(painted, e["mask"], e["color"], config.alpha)

  if config.shuffle_concepts:
    ents = [ents[i] for i in rng.permutation(len(ents))]
  if config.split in ("val", "test") or config.only_gray_concept:
    last = "gray" if config.only_gray_concept else "red"
    ents = sorted(ents, key=lambda e: e["key"] == last)  # stable: the red (gray) ones move to the end
  if config.only_gray_concept:
    ents = ents[-1:]

  target = "".join(f"<{e['key']}>{annotations[e['name']]['caption']}</{e['key']}>" for e in ents)
  colors = [e["key"] for e in ents]
  question = multimask_question(colors) if config.question == "multimask" else ZERO_SHOT_QUESTION
  layout = layout or files.Layout("")
  return {
      "image": painted,
      "question": question,
      "target": target,
      "prompt": f"{question} {target}",
      "colors": colors,
      "mask_names": [e["name"] for e in ents],
      "captions": [annotations[e["name"]]["caption"] for e in ents],
      "concepts": [annotations[e["name"]]["concept"] for e in ents],
      "noun_chunk_roots": [annotations[e["name"]]["noun_chunk_root"] for e in ents],
      "entity_paths": [layout.entity(stem, e["name"]) for e in ents],
      "stem": stem,
      "image_size": (image.height, image.width),
  }


class LlavaSource:
  """Random-access LLaVA examples of one split (a Grain data source; `example(i, epoch)` as InpaintingSource)."""

  def __init__(self, root, config: LlavaConfig = LlavaConfig(), *, seed: int = 0):
    self.layout = files.Layout(os.fspath(root))
    self.config, self.seed = config, int(seed)
    self.split = config.split
    self.stems, self.unannotated = files.list_split(self.layout.root, config.split)
    if self.unannotated:
      logging.warning("%s: %d images have no annotations.json and are not examples",
                      os.path.join(self.layout.root, "images", config.split), len(self.unannotated))

  def __len__(self) -> int:
    return len(self.stems)

  def __getitem__(self, index: int) -> dict:
    return self.example(index, 0)

  def example(self, index: int, epoch: int = 0) -> dict:
    stem = self.stems[index]
    image, anns, masks = files.read_example(self.layout, self.split, stem, files.ANNOTATION_KEYS)
    return make_llava_example(image, anns, masks, self.config, example_rng(self.seed, stem, epoch), stem=stem,
                              layout=self.layout)
