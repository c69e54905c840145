"""The multi-mask inpainting dataset as a TensorFlow Datasets builder writing ArrayRecord shards.

`IdmpInpainting` (TFDS name `idmp_inpainting`) reads a data_prep folder (`mm_inp_dataset/`, SPEC §1) and writes
one record per annotated image of train/val/test:

  stem        Text                the image's stem
  image       Image               the bytes of images/<split>/<stem>.jpg, unchanged (not re-encoded)
  entities    Sequence, in annotations.json order, of
    name        Text              mask_<k>
    mask        Image (H, W, 1)   the bytes of masks/<stem>/mask_<k>.png, unchanged
    concept, noun_chunk_root, caption   Text, from entities/<stem>/annotations.json

Records follow the stems in sorted order (`disable_shuffling`), so record i of a split is example i of
`InpaintingSource`; idmp_jax/data/arrayrecord.py reads them with Grain and no TensorFlow.

Two ways to build:
- `python -m data_prep build-tfds --data-dir=mm_inp_dataset --out=DIR` (`build_tfds` below): fixed shards of
  `--examples-per-shard` records, each written to a temporary file, renamed when complete and then recorded in
  `build_state/`; a re-run skips the recorded shards (resumable per shard), and `--num-processes/--process-id`
  split the shards between processes (any machines sharing DIR). The process that completes the last shard writes
  dataset_info.json / features.json (TFDS's metadata) and idmp_records.json (stems in record order, records left
  out), after which `tfds.builder_from_directory`, `tfds.data_sources` and our Grain source read it.
- TFDS's own `IdmpInpainting(data_dir=DIR).download_and_prepare(download_config=tfds.download.DownloadConfig(
  manual_dir=mm_inp_dataset))` (one process, not resumable): the same records.

Bad records (annotations unreadable or missing a key, an image that does not decode, a mask that does not decode
or whose size differs from the image's) are found by decoding everything before writing, reported with the stem
and path, and left out with a count; a shard is never written half (temporary file + rename).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import sys
import tempfile

import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from data_prep import common
from idmp_jax.data import files
from idmp_jax.data.arrayrecord import RECORDS_FILE, decode_image, decode_mask

CITATION = """\
@inproceedings{fanelli2025idreammypainting,
  title     = {I Dream My Painting: Connecting {MLLMs} and Diffusion Models via Prompt Generation for Text-Guided
               Multi-Mask Inpainting},
  author    = {Fanelli, Nicola and Vessio, Gennaro and Castellano, Giovanna},
  booktitle = {Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year      = {2025}
}"""

DESCRIPTION = """\
Multi-mask inpainting dataset of "I Dream My Painting" (WACV 2025): WikiArt paintings, one binary mask per entity
found by Kosmos-2, each with its concept (the Kosmos-2 phrase, lower-cased), the root of its first noun chunk
(spaCy) and a cleaned LLaVA caption of the entity's crop. Built from a `python -m data_prep` folder; images and
masks are the folder's file bytes, unchanged."""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Build the dataset folder (mm_inp_dataset/) with `python -m data_prep` (download, make-masks, make-entities,
extract-noun-chunk-roots, caption-masks, llava-annotations-to-folder, clean-captions, split) and pass it as
manual_dir, or use `python -m data_prep build-tfds --data-dir=mm_inp_dataset --out=DIR`."""

SPLITS = files.SPLITS
FILE_FORMAT = "array_record"


def features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "stem": text(doc="file stem of images/<split>/<stem>.jpg"),
      "image": tfds.features.Image(doc="the original image file bytes (JPEG), not re-encoded"),
      "entities": tfds.features.Sequence({
          "name": text(doc="mask name, mask_<k>"),
          "mask": tfds.features.Image(shape=(None, None, 1),
                                      doc="binary mask 0/255 of the image's size, the original PNG bytes"),
          "concept": text(doc="Kosmos-2 entity phrase, lower-cased"),
          "noun_chunk_root": text(doc="root of spaCy's first noun chunk of the concept (or the concept)"),
          "caption": text(doc="cleaned LLaVA caption of the entity crop"),
      }, doc="one per mask, in annotations.json order"),
  })


def read_record(layout: files.Layout, split: str, stem: str) -> dict:
  """The record of one image (file bytes plus annotations), after decoding the image and every mask exactly as
  the folder source would; raises files.BadExampleError (with the path) for anything the source would reject."""
  anns = files.read_annotations(layout.annotations(stem), files.ANNOTATION_KEYS)

  def read_bytes(path, what):
    try:
      with open(path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      raise files.BadExampleError(path, f"{what} file is missing") from None

  path = layout.image(split, stem)
  image_bytes = read_bytes(path, "image")
  size = decode_image(image_bytes, path).size
  masks = []
  for name in anns:
    path = layout.mask(stem, name)
    masks.append(read_bytes(path, "mask"))
    decode_mask(masks[-1], path, size)
  entities = {"name": list(anns), "mask": masks}
  for key in files.ANNOTATION_KEYS:
    entities[key] = [entry[key] for entry in anns.values()]
  return {"stem": stem, "image": image_bytes, "entities": entities}


class IdmpInpainting(tfds.core.GeneratorBasedBuilder):
  """The multi-mask inpainting dataset of "I Dream My Painting" (WACV 2025), ArrayRecord by default."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: one record per annotated image of train/val/test with the original image and "
               "mask file bytes and the entity annotations (concept, noun_chunk_root, caption), in stem order.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=DESCRIPTION, features=features(), citation=CITATION,
        disable_shuffling=True)  # record i = sorted stem i, the folder source's index

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in SPLITS}

  def _generate_examples(self, root, split):
    layout, left_out = files.Layout(root), 0
    stems, _ = files.list_split(root, split)
    for i, stem in enumerate(stems):
      try:
        yield i, read_record(layout, split, stem)  # key = index in sorted stems: the order is kept
      except files.BadExampleError as e:
        left_out += 1
        logging.warning("build: leaving out %s/%s: %s", split, stem, e)
    if left_out:
      logging.warning("build: %s: %d of %d records left out", split, left_out, len(stems))


# --- build-tfds: resumable per shard, shardable across processes ---------------------------------------------------

def _plan(root: str, splits, examples_per_shard: int) -> dict:
  """Per split: the sorted annotated stems and the shard count (fixed by the input, not by what turns out bad)."""
  plan = {}
  for split in splits:
    stems, unannotated = files.list_split(root, split)
    plan[split] = {"stems": stems, "unannotated": len(unannotated),
                   "num_shards": max(1, math.ceil(len(stems) / examples_per_shard)) if stems else 0}
  return plan


def _shard_stems(stems, shard: int, num_shards: int):
  return stems[shard * len(stems) // num_shards:(shard + 1) * len(stems) // num_shards]


def _check_plan(state_dir: str, plan: dict, examples_per_shard: int) -> None:
  """Records what this build is (splits, stems digest, shard counts) on the first run; a re-run or another
  process must agree, so shards of different layouts never mix."""
  summary = {"examples_per_shard": examples_per_shard,
             "splits": {s: {"num_stems": len(p["stems"]), "num_shards": p["num_shards"],
                            "stems_sha256": hashlib.sha256("\n".join(p["stems"]).encode()).hexdigest()}
                        for s, p in plan.items()}}
  path = os.path.join(state_dir, "plan.json")
  if os.path.exists(path):
    old = common.read_json(path)
    if old != summary:
      raise ValueError(f"{path}: this output was started with another dataset folder, split list or "
                       f"--examples-per-shard ({old} vs now {summary}); use the same options or a new --out")
  else:
    common.atomic_write_json(path, summary)


def _write_shard(builder, layout, split, shard, num_shards, stems, path, pool, bar) -> dict:
  """Writes one shard file (temporary name, renamed when complete); returns its build_state entry."""
  from array_record.python.array_record_module import ArrayRecordWriter
  serializer = builder.info.features
  tmp = f"{path}.incomplete"
  written, left_out, num_bytes = [], [], 0

  def job(stem):
    try:
      return stem, serializer.serialize_example(read_record(layout, split, stem)), None
    except files.BadExampleError as e:
      return stem, None, {"stem": stem, "path": e.path, "reason": e.reason}

  writer = ArrayRecordWriter(tmp, "group_size:1")  # group size 1: fast random access (Grain)
  try:
    # in order, 64 at a time: at most 64 records wait in memory, whatever the shard size
    results = (r for i in range(0, len(stems), 64) for r in pool.map(job, stems[i:i + 64]))
    for stem, data, bad in results:
      if bad is None:
        writer.write(data)
        written.append(stem)
        num_bytes += len(data)
      else:
        left_out.append(bad)
        print(f"build-tfds: leaving out {split}/{stem}: {bad['path']}: {bad['reason']}", file=sys.stderr)
      bar.update(1)
  finally:
    writer.close()
  os.replace(tmp, path)
  return {"split": split, "shard": shard, "num_shards": num_shards, "num_bytes": num_bytes, "stems": written,
          "left_out": left_out}


def _finalize(builder, version_dir: str, state_dir: str, plan: dict) -> dict:
  """TFDS metadata and idmp_records.json from the build_state entries of every shard."""
  from tensorflow_datasets.core import naming
  split_infos, records = [], {}
  for split, p in plan.items():
    if not p["num_shards"]:
      continue
    entries = [common.read_json(os.path.join(state_dir, f"{split}-{s:05d}-of-{p['num_shards']:05d}.json"))
               for s in range(p["num_shards"])]
    template = naming.ShardedFileTemplate(data_dir=version_dir, dataset_name=builder.name, split=split,
                                          filetype_suffix=FILE_FORMAT)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(e["stems"]) for e in entries],
                                           num_bytes=sum(e["num_bytes"] for e in entries),
                                           filename_template=template))
    records[split] = {"stems": [s for e in entries for s in e["stems"]],
                      "left_out": [b for e in entries for b in e["left_out"]], "unannotated": p["unannotated"]}
  # idmp_records.json first: dataset_info.json is what marks the build finished
  common.atomic_write_json(os.path.join(version_dir, RECORDS_FILE), records, indent=1)
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  # written aside, then renamed in: processes finishing together replace whole files, never write into one
  tmp = tempfile.mkdtemp(dir=state_dir, prefix=".metadata-")
  builder.info.write_to_directory(tmp)
  for name in sorted(os.listdir(tmp), key=lambda n: n == "dataset_info.json"):  # dataset_info.json last
    os.replace(os.path.join(tmp, name), os.path.join(version_dir, name))
  os.rmdir(tmp)
  return records


def build_tfds(data_dir, out_dir, *, splits=SPLITS, examples_per_shard: int = 1000, num_processes: int = 1,
               process_id: int = 0, num_threads: int | None = None, progress: bool = True) -> dict:
  """Builds (or resumes) this process's shards of `out_dir/idmp_inpainting/<version>/`; the process that finds
  every shard done writes the metadata. Returns a summary: build_dir, shards written now / already done,
  records written now, left_out (this process's bad records, with stem, path and reason), finished."""
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
  root = os.fspath(data_dir)
  builder = IdmpInpainting(data_dir=os.fspath(out_dir))
  version_dir = os.fspath(builder.data_path)
  state_dir = os.path.join(version_dir, "build_state")
  if os.path.exists(os.path.join(version_dir, "dataset_info.json")) and not os.path.isdir(state_dir):
    raise FileExistsError(f"{version_dir} holds a dataset not written by build-tfds; remove it or use another --out")
  os.makedirs(state_dir, exist_ok=True)
  plan = _plan(root, splits, examples_per_shard)
  _check_plan(state_dir, plan, examples_per_shard)
  for split, p in plan.items():
    if p["unannotated"]:
      logging.warning("%s: %d images have no annotations.json and are not examples", split, p["unannotated"])

  def entry_path(split, shard, n):
    return os.path.join(state_dir, f"{split}-{shard:05d}-of-{n:05d}.json")

  jobs = [(split, s, p["num_shards"]) for split, p in plan.items() for s in range(p["num_shards"])]
  mine = jobs[process_id::num_processes]  # shards dealt round-robin: processes get similar loads
  todo = [j for j in mine if not os.path.exists(entry_path(*j))]
  layout = files.Layout(root)
  summary = {"build_dir": version_dir, "shards_written": 0, "shards_already_done": len(mine) - len(todo),
             "records_written": 0, "left_out": []}
  total = sum(len(_shard_stems(plan[s]["stems"], i, n)) for s, i, n in todo)
  bar = tqdm(total=total, desc=f"build-tfds {process_id}/{num_processes}", unit="img", file=sys.stderr,
             disable=not progress)
  threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
    for split, shard, n in todo:
      path = os.path.join(version_dir, f"{builder.name}-{split}.{FILE_FORMAT}-{shard:05d}-of-{n:05d}")
      entry = _write_shard(builder, layout, split, shard, n, _shard_stems(plan[split]["stems"], shard, n), path,
                           pool, bar)
      common.atomic_write_json(entry_path(split, shard, n), entry, indent=1)  # the shard counts as done now
      summary["shards_written"] += 1
      summary["records_written"] += len(entry["stems"])
      summary["left_out"] += entry["left_out"]
  bar.close()
  summary["finished"] = all(os.path.exists(entry_path(*j)) for j in jobs)
  if summary["finished"]:
    records = _finalize(builder, version_dir, state_dir, plan)
    summary["counts"] = {s: {"records": len(r["stems"]), "left_out": len(r["left_out"]),
                             "unannotated": r["unannotated"]} for s, r in records.items()}
  return summary
