"""make-masks and make-entities: from Kosmos-2 global annotations to masks/ and entities/ (SPEC §11).

Global annotations (the original's `data/annotations.json`): {"<file>.jpg": {"description": str, "entities":
{"<phrase>": {"startend": [a, b], "bboxes": [[x0, y0, x1, y1], ...]}}}}, boxes normalised to [0, 1].

A box is used iff its area is within 1-65% of the image (computed from the float coordinates, as the original),
then truncated to int(coord * size); a degenerate box is dropped. An entity with no usable box is skipped and
`mask_<k>` numbers only the kept entities, in annotation order: the same k in masks/ and entities/ because both
steps use `entity_boxes`. Masks are 255 on each box (union by max), mode L, image size.
Entities: one crop per box; several boxes become a collage (ceil(sqrt(n)) columns, cells of the largest crop
width and height, gray (127, 127, 127) background, each crop at its cell's top-left).

Differences from the original, deliberately: a missing or unreadable image is reported and counted instead of
stopping the step (make-masks) or printing only (make-entities), files are written atomically, and re-running
make-entities keeps the noun_chunk_root/caption keys of masks whose concept did not change.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
from PIL import Image

from data_prep import common


def box_is_good(width: int, height: int, bbox, min_pct: float = 1, max_pct: float = 65) -> bool:
  """The original's area test, same float expression order."""
  x_min, y_min, x_max, y_max = bbox[0] * width, bbox[1] * height, bbox[2] * width, bbox[3] * height
  area = (x_max - x_min) * (y_max - y_min)
  img_area = width * height
  return area <= (max_pct / 100) * img_area and area >= (min_pct / 100) * img_area


def entity_boxes(width: int, height: int, bboxes) -> list[tuple[int, int, int, int]]:
  """The usable integer boxes (x_min, y_min, x_max, y_max) of one entity."""
  out = []
  for bbox in bboxes:
    if not box_is_good(width, height, bbox):
      continue
    x0, y0 = int(bbox[0] * width), int(bbox[1] * height)
    x1, y1 = int(bbox[2] * width), int(bbox[3] * height)
    if x1 <= x0 or y1 <= y0:
      continue
    out.append((x0, y0, x1, y1))
  return out


def entity_masks(width: int, height: int, entities: dict) -> list[tuple[str, np.ndarray]]:
  """(phrase, uint8 mask) of every entity with at least one usable box, in annotation order."""
  out = []
  for phrase, entity in entities.items():
    boxes = entity_boxes(width, height, entity["bboxes"])
    if not boxes:
      continue
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
      mask[y0:y1, x0:x1] = 255
    out.append((phrase, mask))
  return out


def make_collage(images: list[Image.Image], padding_color=(127, 127, 127)) -> Image.Image:
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  cell_w = max(im.width for im in images)
  cell_h = max(im.height for im in images)
  collage = Image.new("RGB", (cols * cell_w, rows * cell_h), padding_color)
  for i, im in enumerate(images):
    collage.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
  return collage


def _open(index, file_name):
  path = index.get(file_name)
  if path is None:
    raise FileNotFoundError(f"image {file_name} not found")
  image = Image.open(path)
  image.load()
  return image


def _masks_one(item):
  file_name, ann = item
  index, out_dir = common.context()["index"], common.context()["out_dir"]
  try:
    image = _open(index, file_name)
    masks = entity_masks(image.width, image.height, ann["entities"])
    if masks:
      folder = os.path.join(out_dir, common.stem_of(file_name))
      os.makedirs(folder, exist_ok=True)
      for k, (_, mask) in enumerate(masks):
        common.save_image_atomic(Image.fromarray(mask), os.path.join(folder, f"mask_{k}.png"))
    return file_name, len(masks), None
  except Exception as e:
    return file_name, 0, f"{type(e).__name__}: {e}"


def _entities_one(item):
  file_name, ann = item
  index, out_dir = common.context()["index"], common.context()["out_dir"]
  try:
    image = _open(index, file_name)
    folder = os.path.join(out_dir, common.stem_of(file_name))
    annotations = {}
    for phrase, entity in ann["entities"].items():
      boxes = entity_boxes(image.width, image.height, entity["bboxes"])
      if not boxes:
        continue
      crops = [image.crop(b) for b in boxes]
      crop = crops[0] if len(crops) == 1 else make_collage(crops)
      name = f"mask_{len(annotations)}"
      os.makedirs(folder, exist_ok=True)
      common.save_image_atomic(crop, os.path.join(folder, f"{name}.png"))
      annotations[name] = {"concept": phrase.lower()}
    if annotations:
      path = os.path.join(folder, "annotations.json")
      if os.path.exists(path):  # keep later steps' keys where the concept is unchanged
        try:
          old = common.read_json(path)
          for name, entry in annotations.items():
            if isinstance(old.get(name), dict) and old[name].get("concept") == entry["concept"]:
              annotations[name] = {**old[name], **entry}
        except ValueError:
          pass
      common.atomic_write_json(path, annotations)
    return file_name, len(annotations), None
  except Exception as e:
    return file_name, 0, f"{type(e).__name__}: {e}"


def _run(worker, annotations_path, image_dir, out_dir, num_workers, desc) -> int:
  data = common.read_json(annotations_path)
  os.makedirs(out_dir, exist_ok=True)
  shared = {"index": common.image_index(image_dir), "out_dir": os.fspath(out_dir)}
  failed = written = 0
  for file_name, count, error in common.parallel_map(worker, list(data.items()), num_workers, desc, shared):
    if error:
      failed += 1
      print(f"error: {file_name}: {error}", file=sys.stderr)
    written += count > 0
  print(f"{desc}: {written} images with masks, {len(data) - written - failed} without usable boxes, "
        f"{failed} failed")
  return 1 if failed else 0


def make_masks(annotations_path, image_dir, out_dir, num_workers: int = 1) -> int:
  return _run(_masks_one, annotations_path, image_dir, out_dir, num_workers, "make-masks")


def make_entities(annotations_path, image_dir, out_dir, num_workers: int = 1) -> int:
  return _run(_entities_one, annotations_path, image_dir, out_dir, num_workers, "make-entities")
