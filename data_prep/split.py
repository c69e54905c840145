"""split (the original's `train-val-test-split`): move images into images/{train,val,test,unannotated}.

First every image without a masks/<stem>/ folder goes to `unannotated/`; then every row of the split CSV
(columns file_name, split) moves its image, if present in the flat folder, to its split. Re-running is harmless
(images already moved are left alone). Rows naming an unknown split are reported, not moved.

Without a CSV, `random_seed` reproduces the original's fallback algorithm (scikit-learn's train_test_split:
a legacy RandomState permutation, the first `num_test + num_val` to test+val, then the same on those: the first
`num_test` of the second permutation to test, the rest to val) on the stems SORTED, so it is deterministic; the
original applied it to unsorted glob order, so its split cannot be recovered this way: use its CSV.
"""
from __future__ import annotations

import csv
import os
import sys

import numpy as np

from data_prep import common


def split_dataset(image_dir, masks_dir, split_csv=None, random_seed: int | None = None, num_val: int = 5000,
                  num_test: int = 5000) -> int:
  if split_csv is None and random_seed is None:
    raise ValueError("split needs a split CSV (--split-csv) or --random-seed")
  image_dir, masks_dir = os.fspath(image_dir), os.fspath(masks_dir)
  files = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg") and
                 os.path.isfile(os.path.join(image_dir, f)))
  with_masks = set(os.listdir(masks_dir)) if os.path.isdir(masks_dir) else set()
  os.makedirs(os.path.join(image_dir, "unannotated"), exist_ok=True)
  annotated = []
  for f in files:
    if common.stem_of(f) in with_masks:
      annotated.append(f)
    else:
      os.replace(os.path.join(image_dir, f), os.path.join(image_dir, "unannotated", f))
  for split in ("train", "val", "test"):
    os.makedirs(os.path.join(image_dir, split), exist_ok=True)

  assignment, problems = {}, 0
  if split_csv is not None:
    with open(split_csv, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        if row.get("split") not in ("train", "val", "test"):
          problems += 1
          print(f"error: {split_csv}: {row.get('file_name')}: unknown split {row.get('split')!r}", file=sys.stderr)
          continue
        assignment[row["file_name"]] = row["split"]
  elif random_seed is not None:
    n_holdout = num_val + num_test
    if n_holdout >= len(annotated):
      raise ValueError(f"{len(annotated)} annotated images cannot give {num_val} val + {num_test} test")
    perm = np.random.RandomState(random_seed).permutation(len(annotated))
    holdout, train = perm[:n_holdout], perm[n_holdout:]
    perm2 = np.random.RandomState(random_seed).permutation(n_holdout)
    test, val = holdout[perm2[:num_test]], holdout[perm2[num_test:]]
    for idx, split in ((train, "train"), (val, "val"), (test, "test")):
      for i in idx:
        assignment[annotated[i]] = split

  moved = 0
  for file_name, split in assignment.items():
    src = os.path.join(image_dir, file_name)
    if os.path.isfile(src):
      os.replace(src, os.path.join(image_dir, split, file_name))
      moved += 1
  left = [f for f in os.listdir(image_dir) if f.endswith(".jpg") and os.path.isfile(os.path.join(image_dir, f))]
  counts = {s: len(os.listdir(os.path.join(image_dir, s))) for s in common.SPLIT_DIRS}
  print(f"split: moved {moved}; now {counts}; {len(left)} annotated images not in the split list stay in "
        f"{image_dir}")
  return 1 if problems else 0
