"""The dataset on disk (SPEC §1) and reading it with every bad input reported by path.

Layout under the dataset root (`mm_inp_dataset/`):
  images/{train,val,test,unannotated}/<stem>.jpg
  masks/<stem>/mask_<k>.png                 mode L, 0/255, the image's size
  entities/<stem>/mask_<k>.png              the entity crop (or collage)
  entities/<stem>/annotations.json          {"mask_<k>": {"concept", "noun_chunk_root", "caption"}}
  entities/<stem>/llava.json                raw LLaVA captions

Examples of a split are its images that have `entities/<stem>/annotations.json`, sorted by stem (the original used
unsorted glob order); the others are counted (`unannotated`), not errors, as in the original.

Every reader raises `BadExampleError(path, reason)`; `validate_example` runs every check of one example and
returns all problems instead of stopping at the first, and `validate_dataset` does that for whole splits.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
ANNOTATION_KEYS = ("concept", "noun_chunk_root", "caption")


class BadExampleError(Exception):
  """An example that cannot be read: `path` is the offending file, `reason` says what is wrong."""

  def __init__(self, path, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")

  def __reduce__(self):  # picklable across Grain worker processes
    return (BadExampleError, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class Layout:
  root: str

  def image(self, split: str, stem: str) -> str:
    return os.path.join(self.root, "images", split, f"{stem}.jpg")

  def mask(self, stem: str, name: str) -> str:
    return os.path.join(self.root, "masks", stem, f"{name}.png")

  def entity(self, stem: str, name: str) -> str:
    return os.path.join(self.root, "entities", stem, f"{name}.png")

  def annotations(self, stem: str) -> str:
    return os.path.join(self.root, "entities", stem, "annotations.json")


def list_split(root, split: str) -> tuple[list[str], list[str]]:
  """(stems with annotations, stems without) of `images/<split>/*.jpg`, both sorted."""
  layout = Layout(os.fspath(root))
  folder = os.path.join(layout.root, "images", split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such split folder")
  stems = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".jpg"))
  annotated = [s for s in stems if os.path.exists(layout.annotations(s))]
  have = set(annotated)
  return annotated, [s for s in stems if s not in have]


def read_image(path) -> Image.Image:
  """The image, fully decoded and converted to RGB (a truncated file fails here, not later)."""
  try:
    with Image.open(path) as im:
      im.load()
      return im.convert("RGB") if im.mode != "RGB" else im.copy()
  except FileNotFoundError:
    raise BadExampleError(path, "image file is missing") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
    raise BadExampleError(path, f"unreadable or truncated image ({type(e).__name__}: {e})") from None


def read_mask(path, size: tuple[int, int] | None = None) -> np.ndarray:
  """The mask as uint8 (H, W) (converted to L like the original); `size` = the image's PIL (W, H) to match."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode != "L":
        im = im.convert("L")
      arr = np.asarray(im, dtype=np.uint8)
  except FileNotFoundError:
    raise BadExampleError(path, "mask file is missing") from None
  except Exception as e:
    raise BadExampleError(path, f"unreadable mask ({type(e).__name__}: {e})") from None
  if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
    raise BadExampleError(path, f"mask size {arr.shape[1]}x{arr.shape[0]} differs from the image's "
                                f"{size[0]}x{size[1]}")
  return arr


def read_annotations(path, required_keys: Sequence[str] = ("caption",)) -> "OrderedDict[str, dict]":
  """annotations.json in file order (the original's order before the area sort); checks the keys needed."""
  try:
    with open(path, "r", encoding="utf-8") as f:
      data = json.load(f, object_pairs_hook=OrderedDict)
  except FileNotFoundError:
    raise BadExampleError(path, "annotations file is missing") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExampleError(path, f"invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise BadExampleError(path, f"expected a JSON object of masks, got {type(data).__name__}")
  if not data:
    raise BadExampleError(path, "no masks (empty annotations)")
  for name, entry in data.items():
    if not isinstance(entry, dict):
      raise BadExampleError(path, f"{name!r}: expected an object, got {type(entry).__name__}")
    for key in required_keys:
      if key not in entry:
        raise BadExampleError(path, f"{name!r}: missing key {key!r}")
      if not isinstance(entry[key], str):
        raise BadExampleError(path, f"{name!r}: key {key!r} is not a string")
  return data


def read_example(layout: Layout, split: str, stem: str, required_keys: Sequence[str] = ("caption",)):
  """(RGB image, annotations in file order, {mask name: uint8 mask}) of one example, or BadExampleError."""
  anns = read_annotations(layout.annotations(stem), required_keys)
  image = read_image(layout.image(split, stem))
  masks = {name: read_mask(layout.mask(stem, name), image.size) for name in anns}
  return image, anns, masks


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str
  reason: str

  def __str__(self):
    return f"{self.path}: {self.reason}"


def validate_example(layout: Layout, split: str, stem: str, required_keys: Sequence[str] = ANNOTATION_KEYS,
                     check_entities: bool = True) -> list[Problem]:
  """Every problem of one example (image, annotations, each mask, each entity crop), not just the first."""
  problems = []

  def attempt(fn, *args):
    try:
      return fn(*args)
    except BadExampleError as e:
      problems.append(Problem(e.path, e.reason))
      return None

  image = attempt(read_image, layout.image(split, stem))
  size = image.size if image is not None else None
  path = layout.annotations(stem)
  anns = attempt(read_annotations, path, ())
  if anns is None:
    # still check the masks that exist on disk, so a broken JSON does not hide broken masks
    folder = os.path.join(layout.root, "masks", stem)
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
  else:
    names = list(anns)
    for name, entry in anns.items():
      if not isinstance(entry, dict):
        problems.append(Problem(path, f"{name!r}: expected an object, got {type(entry).__name__}"))
        continue
      for key in required_keys:
        if key not in entry:
          problems.append(Problem(path, f"{name!r}: missing key {key!r}"))
        elif not isinstance(entry[key], str):
          problems.append(Problem(path, f"{name!r}: key {key!r} is not a string"))
  for name in names:
    attempt(read_mask, layout.mask(stem, name), size)
    if check_entities and anns is not None:
      entity = layout.entity(stem, name)
      if not os.path.exists(entity):
        problems.append(Problem(entity, "entity crop is missing"))
  return problems


def _validate_one(args):
  root, split, stem, required_keys, check_entities = args
  return validate_example(Layout(root), split, stem, required_keys, check_entities)


def validate_dataset(root, splits: Iterable[str] = SPLITS, required_keys: Sequence[str] = ANNOTATION_KEYS,
                     check_entities: bool = True, num_workers: int = 1, progress: bool = False):
  """(problems, counts): every problem in the splits, and per split the number of examples and of images
  without annotations.json (which the original drops silently; reported here as problems too, since the
  original's `split` step puts every unannotated image under `unannotated/`)."""
  root = os.fspath(root)
  layout = Layout(root)
  problems, counts, jobs = [], {}, []
  for split in splits:
    folder = os.path.join(root, "images", split)
    if not os.path.isdir(folder):
      problems.append(Problem(folder, "split folder is missing"))
      continue
    annotated, unannotated = list_split(root, split)
    counts[split] = {"examples": len(annotated), "unannotated": len(unannotated)}
    for stem in unannotated:
      problems.append(Problem(layout.annotations(stem), f"missing: image {layout.image(split, stem)} has no "
                                                        "annotations (not an example)"))
    jobs += [(root, split, stem, tuple(required_keys), check_entities) for stem in annotated]
  if num_workers > 1:
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
      results = pool.imap(_validate_one, jobs, chunksize=16)
      results = _maybe_progress(results, len(jobs), progress)
      for r in results:
        problems += r
  else:
    for r in _maybe_progress(map(_validate_one, jobs), len(jobs), progress):
      problems += r
  return problems, counts


def _maybe_progress(it, total, progress):
  if not progress:
    return it
  from tqdm import tqdm
  return tqdm(it, total=total, desc="validate")
