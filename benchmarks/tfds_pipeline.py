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

from benchmarks.data_pipeline import (add_input_args, add_timing_args, examples_per_second,  # noqa: E402
                                      finish, prepare_inputs, start_watchdog)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_input_args(p)
  p.add_argument("--build-dir", help="an existing build (<out>/idmp_inpainting/<version>) of --data-dir: time "
                 "reading only (for a machine without TensorFlow, which building needs)")
  p.add_argument("--out", help="build-tfds output (default: a temp dir, removed at the end)")
  add_timing_args(p)
  p.add_argument("--rounds", type=int, default=1, help="folder-then-ArrayRecord measurements per worker count")
  p.add_argument("--build-threads", type=int, help="build-tfds decoding threads (default: its own)")
  args = p.parse_args()
  start_watchdog(args)

  from idmp_jax.data import InpaintingSource
  from idmp_jax.data.arrayrecord import ArrayRecordInpaintingSource

  tmp = tempfile.mkdtemp(prefix="idmp_tfds_bench_")
  tokenizer, config = prepare_inputs(args, tmp)
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

  print(f"opening the sources ({args.data_dir}, {summary['build_dir']})", flush=True)
  folder = InpaintingSource(args.data_dir, args.split, tokenizer, config, seed=0)
  records = ArrayRecordInpaintingSource(summary["build_dir"], args.split, tokenizer, config, seed=0)
  print(f"{len(folder)} {args.split} images; batch {args.batch_size}; cores {os.cpu_count()}", flush=True)
  for workers in args.workers:
    for r in range(args.rounds):  # Alternating rounds: a drift in the machine's speed hits both sources.
      a, _ = examples_per_second(folder, workers, args)
      b, _ = examples_per_second(records, workers, args)
      print(f"workers={workers:3d}{f' round {r + 1}' if args.rounds > 1 else ''}: folder {a:8.1f} examples/s, "
            f"array_record {b:8.1f} examples/s, ratio {b / a:.2f}", flush=True)
  shutil.rmtree(tmp, ignore_errors=True)
  finish()


if __name__ == "__main__":
  main()
