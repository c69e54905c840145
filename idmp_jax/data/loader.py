"""Grain input pipelines: shard by process, shuffle per epoch, build examples in worker processes, batch.

    index stream (MapDataset): positions of this process's shard, shuffled per epoch (grain's index_shuffle with
        seed + epoch), repeated; each element carries its epoch
 -> source.example(record, epoch) (+ `transform`)  -- or a _Skipped marker under "skip"
 -> drop + count + log skipped examples
 -> batch (`collate`)
 -> mp_prefetch(worker_count): everything above runs in the workers, which hand whole batches to the main
    process through shared memory (batching in the main process capped throughput at a few hundred examples/s).
Worker w builds its batches from elements w, w + W, w + 2W, ... of the stream and batches are taken from the
workers in turn, so which examples share a batch depends on the worker count (deterministically); with 0 or 1
worker batches are consecutive elements.

Sharding: each process reads only the contiguous slice `grain.sharding.even_split(len(source), shard_options)`
(default ShardByJaxProcess(drop_remainder=True), so every host runs the same number of steps).

Epochs: `num_epochs` epochs starting at `first_epoch` (None = forever). Batches cross epoch boundaries only
within one loader: for the original's per-epoch batching (last batch of an epoch partial, `drop_last` false)
build one loader per epoch (`num_epochs=1, first_epoch=e`); the example randomness and the shuffle depend on
the epoch, not on the loader, so both ways give the same examples.

Bad input (`bad_input`): "raise" stops with `BadExampleError` naming the file; "skip" drops the example, logs
its path and reason with the running count (absl WARNING), and keeps the count in the iterator state
(`skipped_count(it)`, summed over workers). Batches keep their size (skips are taken before batching).

Resume: `it = iter(dataset)`; `it.get_state()` / `it.set_state(state)` (a JSON-able dict), or with Orbax
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in the training checkpoint (one file per
process). A restored iterator continues with the next unseen batch. A state restores into a loader built with
the same arguments (worker_count included: Grain's multiprocess state records each worker's position).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import logging

from idmp_jax.data.files import BadExampleError


class _Skipped:
  """Marker for an example dropped under the "skip" policy (crosses the worker boundary, so it is tiny)."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = path, reason


class _BuildExample:
  """(epoch, position in shard) -> example; runs in Grain worker processes (pickled with the source)."""

  def __init__(self, source, start: int, bad_input: str, transform: Callable | None):
    self.source, self.start, self.bad_input, self.transform = source, start, bad_input, transform

  def __call__(self, element):
    epoch, position = element
    try:
      example = self.source.example(self.start + int(position), int(epoch))
      return self.transform(example) if self.transform is not None else example
    except BadExampleError as e:
      if self.bad_input == "raise":
        raise
      return _Skipped(e.path, e.reason)


class _SkipBadIterDataset(grain.IterDataset):

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):
  """Drops _Skipped markers in the main process, counting them (the count is part of the iterator state)."""

  def __init__(self, parent):
    super().__init__(parent)
    self.skipped = 0

  def __next__(self):
    while True:
      element = next(self._parent)
      if not isinstance(element, _Skipped):
        return element
      self.skipped += 1
      logging.warning("skipping bad example %s: %s (%d skipped so far by this process)", element.path, element.reason,
                      self.skipped)

  def get_state(self):
    return {"parent": self._parent.get_state(), "skipped": self.skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.skipped = int(state["skipped"])


def collate(examples: Sequence[dict]) -> dict:
  """Stacks array fields of equal shape along a new batch axis; keeps anything else (strings, lists) as lists."""
  batch = {}
  for key in examples[0]:
    values = [ex[key] for ex in examples]
    if all(isinstance(v, (np.ndarray, np.generic)) for v in values) and len({np.shape(v) for v in values}) == 1:
      batch[key] = np.stack(values)
    else:
      batch[key] = values
  return batch


def shard_range(num_records: int, shard_options) -> tuple[int, int]:
  """[start, end) of this shard: grain's even split (contiguous; the public API does not export it)."""
  from grain._src.core.sharding import even_split
  return even_split(num_records, shard_options)


def make_loader(source, *, batch_size: int, seed: int = 0, shuffle: bool = True, num_epochs: int | None = 1,
                first_epoch: int = 0, drop_remainder: bool = False, shard_options=None, worker_count: int = 0,
                worker_buffer_size: int = 2, read_threads: int | None = None, bad_input: str = "raise",
                transform: Callable | None = None, batch_fn: Callable = collate) -> grain.IterDataset:
  """The batched pipeline over `source` (InpaintingSource, LlavaSource, or anything with `len` and
  `example(index, epoch)`). Iterate with `it = iter(loader)`; see the module docstring for state and policies.

  Memory: each process (main, or each worker) builds at most `batch_size` examples ahead with `read_threads`
  threads (default 1 per worker process, 2 without workers), and each worker keeps `worker_buffer_size` finished
  batches. (Grain's default, 16 threads and 500 examples per process, would hold gigabytes of 512 px examples.)"""
  if bad_input not in ("raise", "skip"):
    raise ValueError(f"bad_input must be 'raise' or 'skip', got {bad_input!r}")
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  start, end = shard_range(len(source), shard_options)
  n = end - start
  if n <= 0:
    raise ValueError(f"shard {shard_options.shard_index}/{shard_options.shard_count} of {len(source)} records "
                     "is empty")
  positions = grain.MapDataset.range(n)
  if shuffle:
    positions = positions.shuffle(seed=int(seed) % 2**32)  # index i of epoch e: permutation seeded seed + e
  stream = positions.repeat().map_with_index(lambda i, p: (i // n, p))
  stop = None if num_epochs is None else (first_epoch + num_epochs) * n
  stream = stream[first_epoch * n:stop]
  if read_threads is None:
    read_threads = 1 if worker_count > 0 else 2
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=batch_size)
  ds = stream.map(_BuildExample(source, start, bad_input, transform)).to_iter_dataset(read)
  ds = _SkipBadIterDataset(ds).batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
  if worker_count > 0:
    # grain's worker code reads absl flags; outside an absl app (pytest, notebooks, scripts) use their defaults
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return ds


def steps_per_epoch(num_records: int, batch_size: int, shard_options=None, drop_remainder: bool = False) -> int:
  """Batches one epoch of this process's shard gives (when nothing is skipped)."""
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  start, end = shard_range(num_records, shard_options)
  n = end - start
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def skipped_count(iterator) -> int:
  """Examples skipped so far by an iterator of `make_loader`: the counts in its state, summed over workers."""

  def total(s):
    if isinstance(s, dict):
      own = int(s["skipped"]) if "skipped" in s and "parent" in s else 0
      return own + sum(total(v) for k, v in s.items() if k != "skipped")
    if isinstance(s, (list, tuple)):
      return sum(total(v) for v in s)
    if isinstance(s, (str, bytes)):  # a worker state may be serialised
      try:
        return total(json.loads(s))
      except (ValueError, TypeError):
        return 0
    return 0

  return total(iterator.get_state())


def save_iterator_state(iterator, path) -> None:
  """Writes the iterator state as JSON, atomically (temp file + rename)."""
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w") as f:
    json.dump(iterator.get_state(), f)
  os.replace(tmp, path)


def restore_iterator_state(iterator, path) -> Any:
  with open(path) as f:
    iterator.set_state(json.load(f))
  return iterator
