"""The inpainting example (SPEC §2), value for value as the original `InpaintingDataset.__getitem__`.

Output of `make_inpainting_example` (NumPy, channels last, H = W = resolution):
  pixel_values         (H, W, 3) float32 in [-1, 1]  ((u8 / 255 - 0.5) / 0.5 in float32, as ToTensor+Normalize)
  mask                 (H, W, 1) float32 {0, 1}      union of the kept masks (any non-zero)
  masked_pixel_values  (H, W, 3) float32             pixel_values * (1 - mask)
  input_ids            (77,) int32                   the packed context (§2.8)
  num_masks            () int32                      number of kept masks = number of prompts
 with RCA (`rca=True`, the original's `freestyle`):
  token_region         (77,) int32                   0 for BOS/EOS/pad, i (1-based) for prompt i's tokens
  region_masks         (max_concepts + 1, H, W) uint8 {0, 1}: region 0 all ones, region i = mask i with
                       uncovered pixels set to 1, zero padding (uint8: the original casts it with `.long()`)
 with `extras=True` (val/test):
  stem (str), mask_names (list[str], kept, in order), captions (list[str], ground truth), texts (list[str], the
  prompts used: generated prompts if `prompts_dir`, "" if dropped), masks (max_concepts, H, W) float32 (each kept
  mask after resize/crop, zero padded).

Randomness: one NumPy generator per example from (seed, epoch, stem) (`example_rng`); draws, in order: the
entity pick when max_concepts == 1, the shuffle permutation, the caption-dropout coin (only drawn when there is
exactly one prompt and the probability is > 0, like the original). Epoch 0 = the SPEC's (seed, stem) key; the
loader passes the epoch so training reshuffles every epoch as the original's advancing generator did.
A selection manifest (stem -> kept mask names in order) replaces sort, pick, shuffle and threshold for the stems
it lists, to replay a selection made elsewhere; `selection_of(example)` gives the entry to write one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image

from idmp_jax.data import files


def example_rng(seed: int, stem: str, epoch: int = 0) -> np.random.Generator:
  """The per-example generator: independent of worker and host counts, different per epoch."""
  digest = hashlib.sha256(f"{int(seed)}/{int(epoch)}/{stem}".encode("utf-8")).digest()
  return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def torch_nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch `nearest` (floorf(dst * (in / out)) in float32, clamped). Same rule as
  idmp_jax.models.layers.torch_nearest_indices, restated here so data workers do not import Flax."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def resize_geometry(height: int, width: int, resolution: int) -> tuple[int, int, int, int]:
  """(new_h, new_w, top, left) of torchvision Resize(resolution) + CenterCrop(resolution) (torchvision 0.19):
  the shorter side becomes `resolution`, the longer int(resolution * long / short); crop offsets
  int(round((size - resolution) / 2)) with Python's round-half-to-even."""
  if width <= height:
    new_w, new_h = resolution, int(resolution * height / width)
  else:
    new_h, new_w = resolution, int(resolution * width / height)
  return new_h, new_w, int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))


def resize_crop_image(image: Image.Image, resolution: int) -> np.ndarray:
  """PIL BILINEAR resize (PIL's own antialiasing when downscaling) then centre crop: uint8 (res, res, 3)."""
  new_h, new_w, top, left = resize_geometry(image.height, image.width, resolution)
  if (new_h, new_w) != (image.height, image.width):
    image = image.resize((new_w, new_h), Image.BILINEAR)
  return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def resize_crop_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
  """torch `nearest` resize + centre crop of an (H, W) array, computed only at the kept pixels."""
  h, w = mask.shape
  new_h, new_w, top, left = resize_geometry(h, w, resolution)
  rows = torch_nearest_index(h, new_h)[top:top + resolution]
  cols = torch_nearest_index(w, new_w)[left:left + resolution]
  return np.take(np.take(mask, rows, axis=0), cols, axis=1)


# (x / 255 - 0.5) / 0.5 in float32 for every byte value: a table lookup gives the same floats, faster.
_UNIT_RANGE = ((np.arange(256, dtype=np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)


def to_unit_range(image_u8: np.ndarray) -> np.ndarray:
  """ToTensor + Normalize([0.5], [0.5]) in float32: (x / 255 - 0.5) / 0.5."""
  return _UNIT_RANGE[image_u8]


def threshold_count(masks: Sequence[np.ndarray], threshold: float, full: float = 1.0) -> int:
  """How many masks survive the area threshold (§2.5): the first always; then while the running union's area
  fraction is <= threshold; stop at the first that exceeds it. `full` is a fully-on value (255 for uint8 masks,
  whose union of m / 255 is max(m) / 255; for 0/255 masks sum / 255 is the exact pixel count)."""
  union = np.zeros_like(masks[0])
  total = union.size
  keep = 1
  for i, m in enumerate(masks):
    union = np.maximum(union, m)
    if i == 0:
      continue
    if float(union.sum(dtype=np.float64)) / full / total <= threshold:
      keep += 1
    else:
      break
  return keep


def trim_lengths(lengths: Sequence[int], budget: int) -> list[int]:
  """The original's trimming rule: while over budget and not all equal, decrement the first largest; then, while
  still over, decrement all by one."""
  n = np.asarray(lengths, dtype=np.int64).copy()
  while n.sum() > budget and n.max() != n.min():
    n[int(np.argmax(n))] -= 1
  while n.sum() > budget:
    n -= 1
  return [int(v) for v in n]


def pack_prompts(token_ids: Sequence[Sequence[int]], *, rca: bool, bos_id: int, eos_id: int, pad_id: int,
                 period_id: int, max_length: int = 77):
  """One CLIP context from several prompts (§2.8). `token_ids`: each prompt tokenised separately with BOS/EOS
  (truncated to max_length). Returns (input_ids int32 (max_length,), token_region int32 (max_length,), lengths).
  Without RCA each prompt is followed by "." and the budget shrinks by one per prompt; with RCA no periods and
  token_region numbers each prompt's tokens 1..K (BOS, EOS, pad: 0)."""
  lengths = trim_lengths([len(t) - 2 for t in token_ids],
                         max_length - 2 - (0 if rca else len(token_ids)))
  ids, region = [bos_id], [0]
  for i, (tokens, n) in enumerate(zip(token_ids, lengths)):
    ids += list(tokens[1:1 + n])
    region += [i + 1] * n
    if not rca:
      ids.append(period_id)
      region.append(0)
  ids.append(eos_id)
  region.append(0)
  input_ids = np.full((max_length,), pad_id, np.int32)
  token_region = np.zeros((max_length,), np.int32)
  input_ids[:len(ids)] = ids
  token_region[:len(region)] = region
  return input_ids, token_region, lengths


def region_masks(masks_u8: np.ndarray, max_concepts: int) -> np.ndarray:
  """RCA layout (§2.9) from the kept uint8 masks (K, H, W): (max_concepts + 1, H, W) uint8. The original works on
  m / 255 and casts with `.long()` (truncation), so a region pixel is 1 iff m == 255, or no mask covers it."""
  k, h, w = masks_u8.shape
  out = np.zeros((max_concepts + 1, h, w), np.uint8)
  out[0] = 1
  background = ~np.any(masks_u8, axis=0)
  out[1:k + 1] = (masks_u8 == 255) | background
  return out


@dataclasses.dataclass(frozen=True)
class InpaintingConfig:
  """Options of the original InpaintingDataset. Defaults: its test settings without RCA; training sets
  drop_caption_probability=0.1, the RCA variants rca=True (the original's `freestyle`), val/test extras=True."""
  resolution: int = 512
  max_concepts: int = 5
  masked_area_threshold: float | None = 0.65
  shuffle_concepts: bool = True
  drop_caption_probability: float = 0.0
  rca: bool = False
  extras: bool = False   # val/test: stem, captions, texts, individual masks

  def __post_init__(self):
    if not 1 <= self.max_concepts <= 10:
      raise ValueError(f"max_concepts must be in 1..10, got {self.max_concepts}")


def select_masks(names: Sequence[str], masks: Mapping[str, np.ndarray], config: InpaintingConfig,
                 rng: np.random.Generator) -> list[str]:
  """Steps 2-3: area sort (largest first, stable), keep max_concepts (or one uniformly random entity when
  max_concepts == 1), optional shuffle. Areas are exact integer sums of the uint8 masks: for the dataset's 0/255
  masks they order exactly like the original's float32 sums of mask / 255."""
  areas = [int(masks[n].sum(dtype=np.int64)) for n in names]
  order = sorted(range(len(names)), key=lambda i: areas[i], reverse=True)  # stable, like the original's sorted
  if config.max_concepts == 1:
    order = [int(rng.integers(len(names)))]
  else:
    order = order[:config.max_concepts]
  kept = [names[i] for i in order]
  if config.shuffle_concepts:
    kept = [kept[i] for i in rng.permutation(len(kept))]
  return kept


def make_inpainting_example(image: Image.Image, annotations: Mapping[str, dict], masks: Mapping[str, np.ndarray],
                            tokenizer, config: InpaintingConfig, rng: np.random.Generator, *, stem: str = "",
                            prompts: Sequence[str] | None = None, selection: Sequence[str] | None = None) -> dict:
  """One example from an RGB image, its annotations (file order) and uint8 masks (original size).

  `prompts`: generated prompts replacing the kept captions in order (the original's `texts_dir`, zip semantics:
  extra masks keep their caption). `selection`: kept mask names in order (a manifest entry), replacing steps 2-5.
  """
  names = list(annotations)
  res = config.resolution
  kept = list(selection) if selection is not None else select_masks(names, masks, config, rng)
  for name in kept:
    if name not in masks:
      raise KeyError(f"selection names mask {name!r}, which is not among {names}")
  # masks stay uint8 (0..255); the original's float m / 255 is derived only where a float is needed
  resized = [resize_crop_mask(masks[n], res) for n in kept]
  if selection is None and config.masked_area_threshold is not None:
    count = threshold_count(resized, config.masked_area_threshold, 255.0)
    kept, resized = kept[:count], resized[:count]
  stack = np.stack(resized)                                   # (K, H, W) uint8
  mask = np.any(stack, axis=0).astype(np.float32)[..., None]  # (H, W, 1): any mask non-zero

  pixel_values = to_unit_range(resize_crop_image(image, res))
  captions = [annotations[n]["caption"] for n in kept]
  texts = list(captions)
  if prompts is not None:
    for i, p in zip(range(len(texts)), prompts):
      texts[i] = p
  if len(texts) == 1 and config.drop_caption_probability > 0:
    if rng.random() < config.drop_caption_probability:
      texts = [""]
  input_ids, token_region, _ = pack_prompts(
      tokenizer.encode(texts), rca=config.rca, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, period_id=tokenizer.period_id, max_length=tokenizer.max_length)

  example = {
      "pixel_values": pixel_values,
      "mask": mask,
      "masked_pixel_values": pixel_values * (np.float32(1) - mask),
      "input_ids": input_ids,
      "num_masks": np.int32(len(kept)),
  }
  if config.rca:
    example["token_region"] = token_region
    example["region_masks"] = region_masks(stack, config.max_concepts)
  if config.extras:
    padded = np.zeros((config.max_concepts, res, res), np.float32)
    padded[:len(kept)] = stack.astype(np.float32) / np.float32(255.0)
    example.update(stem=stem, mask_names=list(kept), captions=captions, texts=texts, masks=padded)
  return example


def selection_of(example: Mapping) -> tuple[str, list[str]]:
  """(stem, kept mask names) of an example made with extras: one entry of a selection manifest."""
  return example["stem"], list(example["mask_names"])


def load_selection_manifest(path) -> dict[str, list[str]]:
  with open(path, "r", encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
    raise ValueError(f"{path}: a selection manifest is a JSON object stem -> list of mask names")
  return data


def set_build_options(source, split: str, tokenizer, config: InpaintingConfig, seed: int, prompts_dir,
                      selection) -> None:
  """The attributes `InpaintingSource.build` reads, checked and set: for the folder source and for the
  ArrayRecord source (idmp_jax.data.arrayrecord), which builds its examples with the same `build`."""
  if split not in files.SPLITS:
    raise ValueError(f"split must be one of {files.SPLITS}, got {split!r}")
  if prompts_dir is not None and not os.path.isdir(prompts_dir):
    raise FileNotFoundError(f"{prompts_dir}: prompts folder does not exist")
  source.split, source.tokenizer, source.config, source.seed = split, tokenizer, config, int(seed)
  source.prompts_dir = prompts_dir
  source.selection_path = selection if isinstance(selection, (str, os.PathLike)) else None
  source.selection = load_selection_manifest(selection) if source.selection_path else selection


class InpaintingSource:
  """Random-access examples of one split (a Grain data source: `len`, `[i]` = epoch 0).

  `example(i, epoch)` reads and builds example i of the sorted stems, raising `files.BadExampleError` (with the
  path) on bad input. `prompts_dir` (generated prompts, `<stem>.json` lists) must exist: the original silently
  fell back to ground truth when it did not (quirk, not reproduced).
  """

  def __init__(self, root, split: str, tokenizer, config: InpaintingConfig = InpaintingConfig(), *, seed: int = 0,
               prompts_dir=None, selection: Mapping[str, Sequence[str]] | str | None = None):
    set_build_options(self, split, tokenizer, config, seed, prompts_dir, selection)
    self.layout = files.Layout(os.fspath(root))
    self.stems, self.unannotated = files.list_split(self.layout.root, split)
    if self.unannotated:  # the original dropped these silently
      logging.warning("%s: %d of %d images have no annotations.json and are not examples",
                      os.path.join(self.layout.root, "images", split), len(self.unannotated),
                      len(self.unannotated) + len(self.stems))

  def __len__(self) -> int:
    return len(self.stems)

  def __getitem__(self, index: int) -> dict:
    return self.example(index, 0)

  def example(self, index: int, epoch: int = 0) -> dict:
    stem = self.stems[index]
    image, anns, masks = files.read_example(self.layout, self.split, stem, ("caption",))
    return self.build(stem, image, anns, masks, epoch, self.layout.annotations(stem))

  def build(self, stem: str, image, anns, masks, epoch: int, where: str) -> dict:
    """The example from decoded inputs, with the generated prompts and the selection entry of `stem` (shared by
    every source that reads the same data from another store; `where` names it in errors)."""
    prompts = None
    if self.prompts_dir is not None:
      path = os.path.join(self.prompts_dir, f"{stem}.json")
      try:
        with open(path, "r", encoding="utf-8") as f:
          prompts = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise files.BadExampleError(path, f"generated prompts unreadable ({e})") from None
    selection = None
    if self.selection is not None:
      if stem not in self.selection:
        raise files.BadExampleError(self.selection_path or "<selection manifest>", f"no entry for stem {stem!r}")
      selection = self.selection[stem]
      missing = [n for n in selection if n not in anns]
      if missing:
        raise files.BadExampleError(where, f"selection names unknown masks {missing}")
    return make_inpainting_example(image, anns, masks, self.tokenizer, self.config,
                                   example_rng(self.seed, stem, epoch), stem=stem, prompts=prompts,
                                   selection=selection)
