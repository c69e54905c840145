"""Grain loaders: batching, process shards, per-epoch shuffles, resume from state, bad-input policies, workers."""
import json
import logging
import os

import grain
import numpy as np
import pytest

from idmp_jax.data import (BadExampleError, InpaintingConfig, InpaintingSource, make_loader,
                           restore_iterator_state, save_iterator_state, skipped_count, steps_per_epoch)
from tests.data_fixtures import clip_tokenizer, clip_tokenizer_dir, demo_copy, demo_root  # noqa: F401

ONE = grain.sharding.NoSharding()


class FakeSource:
  """Records which (index, epoch) each example came from; indices in `bad` fail like unreadable files."""

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def example(self, index, epoch=0):
    if index in self.bad:
      raise BadExampleError(f"/data/images/train/{index}.jpg", "unreadable or truncated image")
    return {"index": np.int32(index), "epoch": np.int32(epoch), "x": np.full((2, 3), index, np.float32),
            "name": f"stem{index}"}


def take(it, k):
  return [next(it) for _ in range(k)]


def test_batches_and_collate():
  batches = list(make_loader(FakeSource(10), batch_size=4, shuffle=False, shard_options=ONE))
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert batches[0]["x"].shape == (4, 2, 3) and batches[0]["name"] == ["stem0", "stem1", "stem2", "stem3"]
  dropped = list(make_loader(FakeSource(10), batch_size=4, shuffle=False, shard_options=ONE, drop_remainder=True))
  assert len(dropped) == 2 == steps_per_epoch(10, 4, ONE, drop_remainder=True)
  assert steps_per_epoch(10, 4, ONE) == 3


def test_process_shards_are_disjoint_and_cover():
  seen = []
  for p in range(3):
    opts = grain.sharding.ShardOptions(p, 3, drop_remainder=False)
    seen.append([int(i) for b in make_loader(FakeSource(11), batch_size=2, seed=5, shard_options=opts)
                 for i in b["index"]])
  assert sorted(sum(seen, [])) == list(range(11))
  assert seen[0] and set(seen[0]) <= set(range(0, 4))  # contiguous ranges: 4, 4, 3 records
  even = [list(make_loader(FakeSource(11), batch_size=1, shard_options=grain.sharding.ShardOptions(p, 3, True)))
          for p in range(3)]
  assert [len(e) for e in even] == [3, 3, 3]  # drop_remainder: every host runs the same number of steps


def test_epochs_reshuffle_and_per_epoch_loaders_agree():
  stream = [int(i) for b in make_loader(FakeSource(8), batch_size=8, seed=1, num_epochs=3, shard_options=ONE)
            for i in b["index"]]
  epochs = [stream[8 * e:8 * e + 8] for e in range(3)]
  assert all(sorted(e) == list(range(8)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3
  second = list(make_loader(FakeSource(8), batch_size=3, seed=1, num_epochs=1, first_epoch=1, shard_options=ONE))
  assert [int(i) for b in second for i in b["index"]] == epochs[1]
  assert [len(b["index"]) for b in second] == [3, 3, 2]  # the epoch's last batch is partial, as the original
  assert all(int(e) == 1 for b in second for e in b["epoch"])


def test_resume_continues_with_next_unseen_batch(tmp_path):
  make = lambda: make_loader(FakeSource(13), batch_size=3, seed=2, num_epochs=None, shard_options=ONE)
  it = iter(make())
  take(it, 5)  # crosses the first epoch boundary
  save_iterator_state(it, tmp_path / "state.json")
  expected = [b["index"].tolist() for b in take(it, 6)]
  resumed = restore_iterator_state(iter(make()), tmp_path / "state.json")
  assert [b["index"].tolist() for b in take(resumed, 6)] == expected
  json.loads((tmp_path / "state.json").read_text())  # plain JSON (Orbax: grain.checkpoint.CheckpointSave)


def test_skip_policy_counts_and_logs(caplog):
  caplog.set_level(logging.WARNING)
  it = iter(make_loader(FakeSource(10, bad={2, 7}), batch_size=4, shuffle=False, shard_options=ONE,
                        bad_input="skip"))
  batches = list(it)
  assert [b["index"].tolist() for b in batches] == [[0, 1, 3, 4], [5, 6, 8, 9]]  # sizes kept
  assert skipped_count(it) == 2
  assert "/data/images/train/7.jpg" in caplog.text and "2 skipped so far" in caplog.text


def test_raise_policy_names_the_path():
  with pytest.raises(BadExampleError, match="/data/images/train/2.jpg"):
    list(make_loader(FakeSource(10, bad={2}), batch_size=4, shuffle=False, shard_options=ONE))


def test_real_bad_files_raise_or_skip(demo_copy, clip_tokenizer):
  path = os.path.join(demo_copy, "images", "test", "skimage_coffee.jpg")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])  # truncated JPEG
  src = InpaintingSource(demo_copy, "test", clip_tokenizer, InpaintingConfig(extras=True))
  with pytest.raises(BadExampleError, match="skimage_coffee.jpg"):
    list(make_loader(src, batch_size=1, shuffle=False, shard_options=ONE))
  it = iter(make_loader(src, batch_size=1, shuffle=False, shard_options=ONE, bad_input="skip"))
  assert [b["stem"] for b in it] == [["skimage_camera"]] and skipped_count(it) == 1


def test_workers_batches_skips_and_resume():
  kw = dict(batch_size=2, shuffle=False, shard_options=ONE, bad_input="skip", worker_count=2)
  it = iter(make_loader(FakeSource(12, bad={1, 5, 6}), **kw))
  try:
    first = take(it, 2)
    state = it.get_state()
    rest = list(it)
    assert skipped_count(it) == 3  # summed over the workers' states
  finally:
    it.close()
  # worker 0 batches elements 0, 2, 4, (6 bad), 8, 10; worker 1: (1 bad), 3, (5 bad), 7, 9, 11; taken in turn
  assert [b["index"].tolist() for b in first + rest] == [[0, 2], [3, 7], [4, 8], [9, 11], [10]]
  resumed = iter(make_loader(FakeSource(12, bad={1, 5, 6}), **kw))  # same arguments, worker count included
  try:
    resumed.set_state(state)
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in rest]
  finally:
    resumed.close()


def test_inpainting_examples_through_a_worker(demo_root, clip_tokenizer):
  src = InpaintingSource(demo_root, "train", clip_tokenizer, InpaintingConfig(rca=True), seed=4)
  kw = dict(batch_size=2, seed=9, num_epochs=1, shard_options=ONE)
  inline = list(make_loader(src, **kw))
  it = iter(make_loader(src, worker_count=1, **kw))
  try:
    batches = list(it)
  finally:
    it.close()
  assert len(batches) == len(inline) == 2
  for a, b in zip(inline, batches):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert batches[0]["pixel_values"].shape == (2, 512, 512, 3)
  assert batches[0]["region_masks"].shape == (2, 6, 512, 512) and batches[0]["region_masks"].dtype == np.uint8


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  import orbax.checkpoint as ocp
  make = lambda: iter(make_loader(FakeSource(9), batch_size=2, seed=3, num_epochs=None, shard_options=ONE))
  it = make()
  take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [b["index"].tolist() for b in take(it, 5)]
  restored = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert [b["index"].tolist() for b in take(restored, 5)] == expected


def test_training_close_is_bounded(caplog):
  """train.input.close waits at most its timeout for a close that hangs, says so, and closes a real multi-worker
  iterator stopped mid-stream."""
  import threading
  import time
  from idmp_jax.train import input as train_input

  release = threading.Event()

  class Stuck:
    closed = False

    def close(self):
      release.wait(60)  # A worker join that does not return.
      Stuck.closed = True

  with caplog.at_level(logging.WARNING):
    t0 = time.monotonic()
    waited = train_input.close(Stuck(), timeout_s=0.3)
    assert 0.3 <= waited < 5 and time.monotonic() - t0 < 5
  assert "still stopping" in caplog.text and not Stuck.closed
  release.set()
  assert train_input.close(None) == 0.0

  it = iter(make_loader(FakeSource(40), batch_size=2, shuffle=False, shard_options=ONE, worker_count=2))
  next(it)
  assert train_input.close(it, timeout_s=10.0) < 11.0  # Bounded whether grain's own close stalls or not.
