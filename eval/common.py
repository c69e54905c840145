"""Shared pieces of the eval commands: model-file checks, atomic writes, cache fingerprints, image reading."""
from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from PIL import Image

from idmp_jax.data.inpainting import resize_crop_image, to_unit_range


class ModelFileError(FileNotFoundError):
  """A metric's model file is missing: the message names the metric, what it needs and the flag to pass."""


def require_path(metric: str, path, what: str, flag: str, folder: bool = False) -> str:
  if path is None:
    raise ModelFileError(f"{metric}: needs {what}; pass {flag} (or --models-dir holding it), or drop the metric "
                         f"with --metrics")
  path = os.fspath(path)
  ok = os.path.isdir(path) if folder else os.path.isfile(path)
  if not ok:
    raise ModelFileError(f"{metric}: needs {what}, not found at {path} ({flag}); nothing is downloaded")
  return path


def file_identity(path) -> list:
  """(path, size, mtime) of a file, or of the files of a folder: a cache made with other weights is detected."""
  path = os.path.realpath(path)
  if os.path.isdir(path):
    return [file_identity(os.path.join(path, f)) for f in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, f))]
  st = os.stat(path)
  return [path, st.st_size, st.st_mtime_ns]


def atomic_write(path, write) -> None:
  """`write(file)` into a temporary file beside `path`, then rename: an interrupted run never leaves half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path, obj) -> None:
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")))


def write_text(path, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path):
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def safe_name(stem: str) -> str:
  """A file name for a stem (stems are file names already; this only guards path separators)."""
  return re.sub(r"[\\/]", "_", stem)


def dataset_unit_image(image: Image.Image, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
  """The dataset's transform of an image (SPEC §2.4: resize, centre crop, ToTensor, Normalize) as (3, H, W)
  float32 in [-1, 1], and the original's `x * 0.5 + 0.5` of it in [0, 1] (same float32 steps, so 8-bit
  truncations later see the same values)."""
  x = torch.from_numpy(to_unit_range(resize_crop_image(image.convert("RGB"), resolution))).permute(2, 0, 1)
  x = x.contiguous()
  return x, x * 0.5 + 0.5


def read_rgb(path) -> Image.Image:
  with Image.open(path) as im:
    im.load()
    return im.convert("RGB")


def pick_device(name: str | None) -> str:
  if name:
    return name
  return "cuda" if torch.cuda.is_available() else "cpu"


def cli_main(name: str, parse_args, run, argv=None) -> int:
  """A metric command's main: the markdown table on stdout, exit 0; an unusable input named on stderr, exit 2."""
  import sys

  from idmp_jax.data import files
  args = parse_args(argv)
  try:
    result = run(args)
  except (ModelFileError, FileNotFoundError, ValueError, files.BadExampleError) as e:
    print(f"{name}: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(result["markdown"])
  return 0
