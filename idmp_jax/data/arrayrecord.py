"""Inpainting examples read from the ArrayRecord build of `python -m data_prep build-tfds` (no TensorFlow needed).

The build (data_prep/tfds_builder.py) stores one serialised `tf.train.Example` per image, in the order of the
folder source's sorted stems, with TFDS's flat feature keys:
  stem                    the stem
  image                   the bytes of images/<split>/<stem>.jpg, unchanged
  entities/name           mask names, annotation order          entities/mask     their PNG bytes, unchanged
  entities/concept, entities/noun_chunk_root, entities/caption   the annotations, annotation order
`ArrayRecordInpaintingSource` reads the records with grain's ArrayRecordDataSource, decodes them here (a few lines
of protobuf wire format, so training needs neither TensorFlow nor tensorflow-datasets) and builds each example
with the same `make_inpainting_example` call as `InpaintingSource`: record i is stem i of the folder source, the
image and masks decode to the same pixels (same PIL calls on the same bytes), so for the same seed both sources
give identical examples and `make_loader` / `epoch_loader` identical batches. Records the build left out (bad
input) are absent here, so indices match the folder source only when the build left nothing out.

`make_inpainting_source(config, split, ...)` is the tasks' config choice (`config.data_format` "folder" |
"array_record", with `config.array_record_dir`), shared by inpaint_train and inpaint_sample.

Shards open lazily: the source is built from the shard lengths in dataset_info.json (`file[start:end]`
instructions), so a process opens only the shard files its records are in.
"""
from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from idmp_jax.data import files
from idmp_jax.data.inpainting import InpaintingConfig, InpaintingSource, set_build_options

DATASET_NAME = "idmp_inpainting"
RECORDS_FILE = "idmp_records.json"  # per split: stems in record order, and the records the build left out
ENTITY_KEYS = ("name", "mask") + files.ANNOTATION_KEYS


# --- tf.train.Example without TensorFlow --------------------------------------------------------------------------
# Example {Features features = 1}; Features {map<string, Feature> feature = 1} (entries: key = 1, value = 2);
# Feature {oneof: BytesList bytes_list = 1, FloatList = 2, Int64List = 3}; BytesList {repeated bytes value = 1}.

def _varint(buf, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf, pos: int, end: int):
  """(field number, start, end) of each length-delimited field of buf[pos:end]; other wire types skipped."""
  while pos < end:
    tag, pos = _varint(buf, pos)
    wire = tag & 7
    if wire == 2:
      n, pos = _varint(buf, pos)
      yield tag >> 3, pos, pos + n
      pos += n
    elif wire == 0:
      _, pos = _varint(buf, pos)
    elif wire in (1, 5):
      pos += 8 if wire == 1 else 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def parse_tf_example(data: bytes) -> dict[str, list[bytes]]:
  """The bytes features of a serialised tf.train.Example: {key: [values]} (float/int64 features are refused)."""
  buf = memoryview(data)
  out = {}
  for f, s, e in _fields(buf, 0, len(buf)):
    if f != 1:
      continue
    for f2, s2, e2 in _fields(buf, s, e):
      if f2 != 1:
        continue
      key, values = None, []
      for f3, s3, e3 in _fields(buf, s2, e2):
        if f3 == 1:
          key = bytes(buf[s3:e3]).decode("utf-8")
        elif f3 == 2:
          for kind, s4, e4 in _fields(buf, s3, e3):
            if kind != 1:
              raise ValueError(f"feature {key!r}: only bytes_list features are expected")
            values = [bytes(buf[s5:e5]) for f5, s5, e5 in _fields(buf, s4, e4) if f5 == 1]
      out[key] = values
  return out


# --- decoding: the same PIL calls as files.read_image / files.read_mask, on bytes ----------------------------------

def decode_image(data: bytes, where: str) -> Image.Image:
  """Fully decoded RGB image (as files.read_image); `where` names the record in errors."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.convert("RGB") if im.mode != "RGB" else im.copy()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken bytes
    raise files.BadExampleError(where, f"unreadable or truncated image ({type(e).__name__}: {e})") from None


def decode_mask(data: bytes, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 (H, W) mask converted to L (as files.read_mask); `size` = the image's PIL (W, H) it must match."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode != "L":
        im = im.convert("L")
      arr = np.asarray(im, dtype=np.uint8)
  except Exception as e:
    raise files.BadExampleError(where, f"unreadable mask ({type(e).__name__}: {e})") from None
  if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
    raise files.BadExampleError(where, f"mask size {arr.shape[1]}x{arr.shape[0]} differs from the image's "
                                       f"{size[0]}x{size[1]}")
  return arr


# --- the build on disk --------------------------------------------------------------------------------------------

def find_build(path) -> str:
  """The version folder (holding dataset_info.json) of a build: `path` itself, or the newest version under
  `path/idmp_inpainting/` (the `--out` of build-tfds)."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  parent = os.path.join(path, DATASET_NAME)
  versions = []
  if os.path.isdir(parent):
    for v in os.listdir(parent):
      if os.path.exists(os.path.join(parent, v, "dataset_info.json")):
        try:
          versions.append((tuple(int(x) for x in v.split(".")), v))
        except ValueError:
          pass
  if not versions:
    raise FileNotFoundError(f"{path}: no finished build-tfds output (no dataset_info.json here or under "
                            f"{DATASET_NAME}/<version>/)")
  return os.path.join(parent, max(versions)[1])


def shard_instructions(build_dir, split: str) -> list[str]:
  """`file[0:n]` read instructions of a split's shards from dataset_info.json (no shard file is opened)."""
  path = os.path.join(build_dir, "dataset_info.json")
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("fileFormat") != "array_record":
    raise ValueError(f"{path}: file format {info.get('fileFormat')!r}, expected 'array_record'")
  for s in info.get("splits", []):
    if s["name"] == split:
      lengths = [int(n) for n in s.get("shardLengths", [])]
      name = f"{info['name']}-{split}.array_record"
      return [f"{os.path.join(build_dir, name)}-{i:05d}-of-{len(lengths):05d}[0:{n}]"
              for i, n in enumerate(lengths) if n > 0]
  raise ValueError(f"{path}: no split {split!r}")


def read_records_file(build_dir) -> dict:
  path = os.path.join(build_dir, RECORDS_FILE)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class ArrayRecordInpaintingSource:
  """Random-access inpainting examples of one split of a build-tfds output (same interface and examples as
  `InpaintingSource`: `len`, `[i]`, `example(i, epoch)`, `stems`, `split`, `seed`, `config`, `tokenizer`)."""

  def __init__(self, build, split: str, tokenizer, config: InpaintingConfig = InpaintingConfig(), *,
               seed: int = 0, prompts_dir=None, selection: Mapping[str, Sequence[str]] | str | None = None):
    import grain
    set_build_options(self, split, tokenizer, config, seed, prompts_dir, selection)
    self.build_dir = find_build(build)
    self.stems = read_records_file(self.build_dir)[split]["stems"]
    self.records = grain.sources.ArrayRecordDataSource(shard_instructions(self.build_dir, split))
    if len(self.records) != len(self.stems):
      raise ValueError(f"{self.build_dir}: split {split!r} has {len(self.records)} records but {RECORDS_FILE} "
                       f"lists {len(self.stems)} stems")

  def __len__(self) -> int:
    return len(self.stems)

  def __getitem__(self, index: int) -> dict:
    return self.example(index, 0)

  def where(self, index: int) -> str:
    return f"{self.build_dir}[{self.split}][{index}]"

  def read(self, index: int):
    """(stem, RGB image, annotations OrderedDict, {name: uint8 mask}) of record `index`, as files.read_example."""
    try:
      feats = parse_tf_example(self.records[index])
      stem = feats["stem"][0].decode("utf-8")
      cols = {k: feats[f"entities/{k}"] for k in ENTITY_KEYS}
      names = [n.decode("utf-8") for n in cols["name"]]
      anns = OrderedDict((n, {k: cols[k][i].decode("utf-8") for k in files.ANNOTATION_KEYS})
                         for i, n in enumerate(names))
    except (ValueError, KeyError, IndexError) as e:  # UnicodeDecodeError is a ValueError
      raise files.BadExampleError(self.where(index), f"corrupt record ({type(e).__name__}: {e})") from None
    where = f"{self.where(index)} ({stem})"
    image = decode_image(feats["image"][0], where)
    masks = {n: decode_mask(m, f"{where} {n}", image.size) for n, m in zip(names, cols["mask"])}
    return stem, image, anns, masks

  def example(self, index: int, epoch: int = 0) -> dict:
    stem, image, anns, masks = self.read(index)
    # Same attributes as InpaintingSource (prompts_dir, selection, tokenizer, config, seed): one build path.
    return InpaintingSource.build(self, stem, image, anns, masks, epoch, self.where(index))


def inpainting_source(path, split: str, tokenizer, config: InpaintingConfig = InpaintingConfig(), *,
                      data_format: str = "auto", **kwargs):
  """The config choice: "folder" (a data_prep `mm_inp_dataset/`), "array_record" (a build-tfds output), or
  "auto" (array_record when `path` holds a build). Same keyword arguments as InpaintingSource."""
  if data_format == "auto":
    try:
      find_build(path)
      data_format = "array_record"
    except FileNotFoundError:
      data_format = "folder"
  if data_format == "folder":
    return InpaintingSource(path, split, tokenizer, config, **kwargs)
  if data_format == "array_record":
    return ArrayRecordInpaintingSource(path, split, tokenizer, config, **kwargs)
  raise ValueError(f"data_format must be 'folder', 'array_record' or 'auto', got {data_format!r}")


DATA_FORMATS = ("folder", "array_record")


def data_source_path(config, data_dir=None) -> tuple[str, str]:
  """(data_format, folder) the inpainting tasks read, from `config.data_format` ("folder", the default: `data_dir`,
  a data_prep `mm_inp_dataset/`; "array_record": `config.array_record_dir`, a build-tfds output or one of its
  version folders). Checked before any compute: each error names the config field and the folder."""
  data_format = config.get("data_format", "folder")
  if data_format == "folder":
    if not data_dir or not os.path.isdir(data_dir):
      raise FileNotFoundError(f"config.data_dir = {data_dir!r}: dataset folder not found")
    return data_format, os.fspath(data_dir)
  if data_format == "array_record":
    path = config.get("array_record_dir", "")
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(f"config.array_record_dir = {path!r}: folder not found (config.data_format = "
                              "'array_record' reads the output of `python -m data_prep build-tfds`)")
    try:
      return data_format, find_build(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.array_record_dir: {e}") from None
  raise ValueError(f"config.data_format = {data_format!r}: expected one of {DATA_FORMATS}")


def make_inpainting_source(config, split: str, tokenizer, data_config: InpaintingConfig, *, data_dir=None,
                           **kwargs):
  """The inpainting source of a task config: the one place where `inpaint_train` and `inpaint_sample` choose
  between the folder and the ArrayRecord build (`data_source_path`). Both give the same examples for the same
  seed; keyword arguments (seed, prompts_dir, selection) are InpaintingSource's."""
  data_format, path = data_source_path(config, data_dir)
  return inpainting_source(path, split, tokenizer, data_config, data_format=data_format, **kwargs)
