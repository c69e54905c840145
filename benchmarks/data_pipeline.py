"""Inpainting input pipeline throughput: examples/s at 512 px (RCA on, training settings) per worker count.

  python benchmarks/data_pipeline.py --workers 0 2                       # demo data, built in a temp dir
  python benchmarks/data_pipeline.py --data-dir data/mm_inp_dataset --tokenizer models/sd2-inp --workers 8 16

Without --data-dir it builds the demo dataset (scikit-image photographs, `--copies` variants per train image;
`--long-side N` rescales its train images and masks so their longer side is N px, closer to WikiArt's sizes).
Without --tokenizer it builds a CLIP tokenizer folder from open_clip's vocabulary (tests/tiny_clip_tokenizer.py;
`pip install --no-deps open-clip-torch`). Each configuration runs `--warmup` batches (worker start-up; by
default workers + 2) and then times `--batches` batches; examples/s = batches * batch_size / seconds. Runs of a
few seconds swing by up to 2x on the 16-core machine (2026-12-02): time 200+ batches there. Between
configurations the workers are killed (`stop_loader`). The target (issue 4): >= 250 examples/s on 16 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rescale(root, split, long_side):
  """Images (bicubic, JPEG) and their masks (nearest, PNG) to a longer side of `long_side` px."""
  from PIL import Image
  folder = os.path.join(root, "images", split)
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    with Image.open(path) as im:
      w, h = im.size
      size = (long_side, round(h * long_side / w)) if w >= h else (round(w * long_side / h), long_side)
      im.convert("RGB").resize(size, Image.BICUBIC).save(path)
    masks = os.path.join(root, "masks", name[:-4])
    for mask_name in os.listdir(masks):
      with Image.open(os.path.join(masks, mask_name)) as m:
        m.resize(size, Image.NEAREST).save(os.path.join(masks, mask_name))


def examples_per_second(source, workers: int, args) -> tuple[float, float]:
  """(examples/s, seconds) over --batches batches after --warmup. By default each example goes through
  `idmp_jax.train.input.compact` in the workers, as inpaint_train's loader does (bf16 pixels, uint8 mask, region
  masks at stride 8: 2.1 MB instead of 9.3 MB through the worker queues at 512 px); --raw times the examples
  as the source builds them."""
  import functools

  import grain

  from idmp_jax.data import make_loader
  from idmp_jax.train import input as train_input
  transform = None if args.raw else functools.partial(train_input.compact, pixel_dtype="bfloat16",
                                                      region_stride=train_input.region_stride(512, 64, 4))
  loader = make_loader(source, batch_size=args.batch_size, seed=0, num_epochs=None, worker_count=workers,
                       worker_buffer_size=args.buffer, shard_options=grain.sharding.NoSharding(),
                       drop_remainder=True, transform=transform)
  # Each worker reads up to a batch ahead (make_loader's read-ahead) plus its output buffer: the first batches
  # after start-up come partly from those buffers, so the warm-up drains them before the clock starts.
  warmup = args.warmup if args.warmup is not None else workers + 2
  it = iter(loader)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    seconds = time.perf_counter() - start
  finally:
    stop_loader(it)
  assert batch["pixel_values"].shape == (args.batch_size, 512, 512, 3)
  return args.batches * args.batch_size / seconds, seconds


def stop_loader(it) -> None:
  """Kills a loader's worker processes at once, then closes it. Grain's own close stops workers one after the
  other, joining each for up to 25 s: with 16 workers stopped mid-stream that outlasts the measurement, and its
  work would run on the cores while the next loader is timed."""
  import multiprocessing
  for child in multiprocessing.active_children():
    child.kill()
    child.join()
  if hasattr(it, "close"):
    it.close()


def finish() -> None:
  """Exits without waiting on worker processes (none should be left after stop_loader)."""
  import multiprocessing
  for child in multiprocessing.active_children():
    child.kill()
  sys.stdout.flush()
  os._exit(0)


def add_input_args(p) -> None:
  p.add_argument("--data-dir")
  p.add_argument("--tokenizer")
  p.add_argument("--split", default="train")
  p.add_argument("--copies", type=int, default=8)
  p.add_argument("--long-side", type=int, help="rescale the demo's train images to this longer side")


def prepare_inputs(args, tmp: str):
  """(tokenizer, InpaintingConfig at 512 px with RCA and training's caption dropout); builds the demo dataset
  and a CLIP tokenizer folder under `tmp` where --data-dir / --tokenizer are not given (sets them in args)."""
  from idmp_jax.data import InpaintingConfig, load_clip_tokenizer
  if args.data_dir is None:
    from data_prep.demo import make_demo_dataset
    args.data_dir = make_demo_dataset(os.path.join(tmp, "demo"), copies=args.copies)
    if args.long_side:
      rescale(args.data_dir, args.split, args.long_side)
  if args.tokenizer is None:
    from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder
    args.tokenizer = make_clip_tokenizer_folder(os.path.join(tmp, "tokenizer"))
  return (load_clip_tokenizer(args.tokenizer),
          InpaintingConfig(resolution=512, rca=True, drop_caption_probability=0.1))


def add_timing_args(p) -> None:
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--warmup", type=int, default=None,
                 help="batches before the clock starts (default: workers + 2, enough to drain the read-ahead)")
  p.add_argument("--buffer", type=int, default=2, help="per-worker buffer (batches)")
  p.add_argument("--raw", action="store_true", help="time the examples as built, not as training ships them")
  p.add_argument("--watchdog", type=float, default=0,
                 help="every this many seconds, print every thread's stack to stderr (diagnoses a stall; 0 = off)")


def start_watchdog(args) -> None:
  if args.watchdog > 0:
    import faulthandler
    faulthandler.dump_traceback_later(args.watchdog, repeat=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_input_args(p)
  add_timing_args(p)
  args = p.parse_args()
  start_watchdog(args)

  from idmp_jax.data import InpaintingSource

  tmp = tempfile.mkdtemp(prefix="idmp_bench_")
  tokenizer, config = prepare_inputs(args, tmp)
  source = InpaintingSource(args.data_dir, args.split, tokenizer, config, seed=0)
  print(f"{len(source)} {args.split} images in {args.data_dir}; batch {args.batch_size}; cores {os.cpu_count()}")
  for workers in args.workers:
    eps, seconds = examples_per_second(source, workers, args)
    print(f"workers={workers:3d}: {eps:8.1f} examples/s ({args.batches} batches in {seconds:.2f} s; "
          f"{'raw examples' if args.raw else 'as training ships them (compact)'})", flush=True)
  shutil.rmtree(tmp, ignore_errors=True)
  finish()


if __name__ == "__main__":
  main()
