"""Hand-made examples in the dataset's on-disk format, for edge cases the demo photographs do not hit."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 255
  return m


def write_example(root, split: str, stem: str, image: np.ndarray, masks: dict[str, np.ndarray],
                  captions: dict[str, str] | None = None, annotations: dict | None = None) -> None:
  """Writes images/<split>/<stem>.jpg (quality 95), masks/<stem>/<name>.png, entities/<stem>/annotations.json
  (+ an entity crop per mask). `annotations` overrides the generated JSON content."""
  root = os.fspath(root)
  for sub in (f"images/{split}", f"masks/{stem}", f"entities/{stem}"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  Image.fromarray(image).save(os.path.join(root, "images", split, f"{stem}.jpg"), quality=95)
  for name, m in masks.items():
    Image.fromarray(m).save(os.path.join(root, "masks", stem, f"{name}.png"))
    Image.fromarray(image[:8, :8]).save(os.path.join(root, "entities", stem, f"{name}.png"))
  if annotations is None:
    captions = captions or {}
    annotations = {n: {"concept": f"thing {n}", "noun_chunk_root": "thing", "caption": captions.get(n, f"a {n}")}
                   for n in masks}
  with open(os.path.join(root, "entities", stem, "annotations.json"), "w") as f:
    json.dump(annotations, f, indent=4)


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Smooth-ish random colours (JPEG keeps them close), so resize differences would show."""
  small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
