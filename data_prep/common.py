"""Helpers shared by the data_prep steps: atomic writes, image lookup, parallel map with a progress bar."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Callable, Iterable

from tqdm import tqdm

SPLIT_DIRS = ("train", "val", "test", "unannotated")


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes via a temp file in the same folder + rename: readers never see a half-written file."""
  folder = os.path.dirname(os.fspath(path)) or "."
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path, obj, indent: int = 4) -> None:
  atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def save_image_atomic(image, path, **kwargs) -> None:
  """PIL image -> file (format from the extension) through a temp file + rename."""
  import io
  buf = io.BytesIO()
  fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[os.fspath(path).rsplit(".", 1)[-1].lower()]
  image.save(buf, format=fmt, **kwargs)
  atomic_write_bytes(path, buf.getvalue())


def read_json(path):
  with open(path, "r", encoding="utf-8") as f:
    return json.load(f)


def image_index(image_dir) -> dict[str, str]:
  """File name -> path, for images directly in `image_dir` or in its split subfolders (before or after `split`)."""
  index = {}
  image_dir = os.fspath(image_dir)
  for entry in sorted(os.listdir(image_dir)):
    path = os.path.join(image_dir, entry)
    if os.path.isdir(path):
      for name in os.listdir(path):
        index.setdefault(name, os.path.join(path, name))
    else:
      index[entry] = path
  return index


def stem_of(file_name: str) -> str:
  return os.path.splitext(file_name)[0]


_CONTEXT: dict = {}


def _set_context(context):
  _CONTEXT.update(context)


def context() -> dict:
  """What `parallel_map` gave every worker once (large read-only data, e.g. an image index)."""
  return _CONTEXT


def parallel_map(fn: Callable, items: list, num_workers: int, desc: str, shared: dict | None = None) -> Iterable:
  """fn over items (in worker processes when num_workers > 1), results in completion order, with a progress bar
  updated by the main process (so it stays correct whatever the number of workers). `shared` is sent to each
  worker once (readable with `context()`), not with every task."""
  bar = tqdm(total=len(items), desc=desc, file=sys.stderr, disable=None)
  if num_workers <= 1:
    _set_context(shared or {})
    for item in items:
      yield fn(item)
      bar.update(1)
  else:
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(num_workers, initializer=_set_context,
                                                   initargs=(shared or {},)) as pool:
      for result in pool.imap_unordered(fn, items, chunksize=8):
        yield result
        bar.update(1)
  bar.close()
