"""Training input: one Grain pipeline per epoch whose GLOBAL batches do not depend on the number of processes.

`idmp_jax.data.make_loader` shards by process first (each host shuffles its own contiguous slice), so the
examples that meet in one step change with the host count. Here every process walks the same permutation of the
whole split (grain's index_shuffle, seeded seed + epoch) and builds only its rows of each global batch:

  global batch k = perm[k*B : (k+1)*B];  process p takes rows [p*L, (p+1)*L), L = B / process_count

so 1 process and 2 processes train on the same batches, and the loss sequence can be compared across host
counts. The epoch ends with a partial batch (the original's drop_last=False: 92,276 = 2,883 x 32 + 20): it is
padded to B with rows marked valid = 0, which the loss leaves out, so shapes stay fixed (no recompile, always
divisible over devices). Each example also carries `index` (its position in the split) so a bad batch can be named.

Examples are built by `source.example(index, epoch)` (InpaintingSource), in Grain worker processes when
worker_count > 0, and made compact there (`compact`) before they cross to the main process and the device. The iterator is a Grain DatasetIterator: `get_state`/`set_state`, Orbax via
grain.checkpoint.CheckpointSave/CheckpointRestore.
"""
from __future__ import annotations

import logging
import math
import threading
import time

import grain
import numpy as np

from idmp_jax.data.loader import collate


def compact(example: dict, pixel_dtype: str | None = None, region_stride: int = 1) -> dict:
  """The same example in fewer bytes (at 512 px, 9.3 MB -> 2.1 MB with bf16 pixels and stride 8), losslessly for
  the step: masked_pixel_values is dropped (the step recomputes pixel_values * (1 - mask), the same fp32
  product, and in bf16 the product with a 0/1 mask commutes with the cast); pixel_values go to the VAE's compute
  dtype (the step casts to it anyway); mask to uint8; region_masks keep every `region_stride`-th row and column,
  which are the only pixels torch-nearest resizing to the latent grids ever reads (see `region_stride`)."""
  out = dict(example)
  out.pop("masked_pixel_values", None)
  if pixel_dtype is not None:
    if pixel_dtype == "bfloat16":  # by name: workers need not import jax to unpickle a bfloat16 dtype
      import ml_dtypes
      pixel_dtype = ml_dtypes.bfloat16
    out["pixel_values"] = np.asarray(out["pixel_values"]).astype(pixel_dtype)
  out["mask"] = np.asarray(out["mask"]).astype(np.uint8)
  if "region_masks" in out and region_stride > 1:
    out["region_masks"] = np.ascontiguousarray(out["region_masks"][:, ::region_stride, ::region_stride])
  return out


def region_stride(resolution: int, latent_size: int, num_levels: int) -> int:
  """The largest stride s such that picking [::s] first and then resizing gives exactly the masks the UNet's
  RCA takes at every level (torch nearest from `resolution` to each feature size h: index floor(i * res / h)).
  Holds when every feature size divides `latent_size` and `latent_size` divides `resolution`; else 1."""
  sizes, h = [], latent_size
  for _ in range(num_levels):
    sizes.append(h)
    h = (h + 1) // 2
  if resolution % latent_size or any(latent_size % h for h in sizes):
    return 1
  return resolution // latent_size


class _Row:
  """Element i of this process's stream -> the example at that row of its global batch (picklable)."""

  def __init__(self, source, perm, num_records: int, global_batch: int, local_batch: int, process_index: int,
               epoch: int, transform=None):
    self.source, self.perm, self.n = source, perm, num_records
    self.global_batch, self.local, self.p, self.epoch = global_batch, local_batch, process_index, epoch
    self.transform = transform

  def __call__(self, i):
    k, j = divmod(int(i), self.local)
    g = k * self.global_batch + self.p * self.local + j
    valid = g < self.n
    index = int(self.perm[g % self.n]) if self.perm is not None else g % self.n
    example = dict(self.source.example(index, self.epoch))
    example["valid"] = np.float32(valid)
    example["index"] = np.int32(index)
    return self.transform(example) if self.transform is not None else example


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Resolves transformers' lazy CLIPTokenizer import once per worker, before the worker's read threads start:
  transformers' lazy module is not thread-safe on first import (concurrent `from transformers import
  CLIPTokenizer` raises ImportError), and a tokenizer unpickled in a worker loads on first use."""
  del worker_index, worker_count
  try:
    from transformers import CLIPTokenizer  # noqa: F401
  except ImportError:
    pass


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  return math.ceil(num_records / global_batch)


def epoch_loader(source, *, global_batch: int, epoch: int, seed: int, process_index: int, process_count: int,
                 shuffle: bool = True, worker_count: int = 0, worker_buffer_size: int = 4, read_threads: int = 4,
                 transform=None) -> grain.IterDataset:
  """This process's batches of one epoch: `steps_per_epoch` batches of global_batch / process_count rows.
  `transform` (picklable) runs on each example in the workers, e.g. functools.partial(compact, ...)."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  n = len(source)
  if n == 0:
    raise ValueError("the training split is empty")
  local = global_batch // process_count
  perm = grain.MapDataset.range(n).shuffle(seed=(int(seed) + int(epoch)) % 2**32) if shuffle else None
  rows = grain.MapDataset.range(steps_per_epoch(n, global_batch) * local)
  # Grain's default read-ahead (16 threads, 500 examples) would hold ~1 GB of 512-px examples per worker process.
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * local, 8))
  ds = rows.map(_Row(source, perm, n, global_batch, local, process_index, epoch, transform)).to_iter_dataset(read)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size),
                        worker_init_fn=_init_worker)
  return ds.batch(local, drop_remainder=False, batch_fn=collate)


def device_fields(batch: dict, keys) -> dict:
  """The array fields the step consumes (host-side extras such as `index` stay behind)."""
  return {k: batch[k] for k in keys if k in batch}


def close(iterator, timeout_s: float = 10.0) -> float:
  """Stops a Grain iterator's worker processes now rather than at interpreter exit, waiting at most `timeout_s`;
  returns the seconds waited.

  An iterator that ran to its end closes at once. One stopped mid-stream (the next epoch's, opened and
  checkpointed before the run ended; early stopping) may not: grain's close joins its workers one after the
  other, up to 25 s each, and on the 16-core GPU machine that held the end of a run ~40 s (BENCHMARKS.md). A
  worker it waits on is blocked, not computing; so the close goes on in a daemon thread, and past `timeout_s`
  the run continues, the workers (daemon processes) ending with it at the latest."""
  if iterator is None or not hasattr(iterator, "close"):
    return 0.0
  start = time.monotonic()
  closing = threading.Thread(target=iterator.close, name="data-iterator-close", daemon=True)
  closing.start()
  closing.join(timeout_s)
  waited = time.monotonic() - start
  if closing.is_alive():
    logging.warning("the data iterator's workers are still stopping after %.0f s; continuing without them",
                    waited)
  return waited
