"""Folder vs ArrayRecord input: examples/s of the full inpainting pipeline at 512 px, and build-tfds time.

  python benchmarks/tfds_pipeline.py --workers 0 2                     # demo data, built in a temp dir
  python benchmarks/tfds_pipeline.py --data-dir data/mm_inp_dataset --tokenizer models/sd2-inp --workers 8 16

Without --data-dir it builds the demo dataset (`--copies` variants per train image; `--long-side N` rescales
the train images and masks to a longer side of N px, as benchmarks/data_pipeline.py). It then times
`python -m data_prep build-tfds`'s function over the whole dataset (seconds per 1,000 images: decoding every image
and mask to validate it, serialising, writing) and, for each worker count, the same loader (RCA on, training
settings, batch --batch-size) over the folder source and over the ArrayRecord source: `--warmup` batches, then
`--batches` timed. Issue 11 asks the ArrayRecord source to be at least as fast as the folder (ratio >= 1).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.data_pipeline import add_timing_args, examples_per_second  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir")
  p.add_argument("--tokenizer")
  p.add_argument("--build-dir", help="an existing build (<out>/idmp_inpainting/<version>) of --data-dir: time "
                 "reading only (for a machine without TensorFlow, which building needs)")
  p.add_argument("--out", help="build-tfds output (default: a temp dir, removed at the end)")
  p.add_argument("--split", default="train")
  add_timing_args(p)
  p.add_argument("--copies", type=int, default=8)
  p.add_argument("--long-side", type=int, help="rescale the demo's train images to this longer side")
  p.add_argument("--build-threads", type=int, help="build-tfds decoding threads (default: its own)")
  args = p.parse_args()

  from idmp_jax.data import InpaintingConfig, InpaintingSource, load_clip_tokenizer
  from idmp_jax.data.arrayrecord import ArrayRecordInpaintingSource

  tmp = tempfile.mkdtemp(prefix="idmp_tfds_bench_")
  if args.data_dir is None:
    from data_prep.demo import make_demo_dataset
    args.data_dir = make_demo_dataset(os.path.join(tmp, "demo"), copies=args.copies)
    if args.long_side:
      from benchmarks.data_pipeline import rescale
      rescale(args.data_dir, args.split, args.long_side)
  if args.tokenizer is None:
    from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder
    args.tokenizer = make_clip_tokenizer_folder(os.path.join(tmp, "tokenizer"))
  out = args.out or os.path.join(tmp, "tfds")

  if args.build_dir:
    summary = {"build_dir": args.build_dir}
  else:
    from data_prep.tfds_builder import build_tfds
    start = time.perf_counter()
    summary = build_tfds(args.data_dir, out, num_threads=args.build_threads, progress=False)
    seconds = time.perf_counter() - start
    images = summary["records_written"] + len(summary["left_out"])
    print(f"build-tfds: {images} images in {seconds:.2f} s = {1000 * seconds / max(images, 1):.1f} s per 1,000 "
          f"images ({summary['shards_written']} shard(s) written now; cores {os.cpu_count()})", flush=True)

  tokenizer = load_clip_tokenizer(args.tokenizer)
  config = InpaintingConfig(resolution=512, rca=True, drop_caption_probability=0.1)
  folder = InpaintingSource(args.data_dir, args.split, tokenizer, config, seed=0)
  records = ArrayRecordInpaintingSource(summary["build_dir"], args.split, tokenizer, config, seed=0)
  print(f"{len(folder)} {args.split} images; batch {args.batch_size}; cores {os.cpu_count()}", flush=True)
  for workers in args.workers:
    a, _ = examples_per_second(folder, workers, args)
    b, _ = examples_per_second(records, workers, args)
    print(f"workers={workers:3d}: folder {a:8.1f} examples/s, array_record {b:8.1f} examples/s, "
          f"ratio {b / a:.2f}", flush=True)
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
