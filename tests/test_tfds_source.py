"""The ArrayRecord source: the folder source's examples value for value, process shards, resume, workers."""
import grain
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import tfds_builder  # noqa: E402
from idmp_jax.data import InpaintingConfig, InpaintingSource, make_loader  # noqa: E402
from idmp_jax.data.arrayrecord import ArrayRecordInpaintingSource, inpainting_source  # noqa: E402
from tests.data_fixtures import clip_tokenizer, clip_tokenizer_dir, demo_root  # noqa: E402,F401

ONE = grain.sharding.NoSharding()
TRAIN = InpaintingConfig(rca=True, drop_caption_probability=0.1)
EVAL = InpaintingConfig(rca=True, extras=True)


@pytest.fixture(scope="module")
def build(demo_root, tmp_path_factory):
  # 2 records per shard: train's 4 records lie in 2 shard files, so a process reading half opens one
  return tfds_builder.build_tfds(demo_root, tmp_path_factory.mktemp("tfds"), examples_per_shard=2,
                                 progress=False)["build_dir"]


def both(demo_root, build, split, tokenizer, config, **kw):
  folder = inpainting_source(demo_root, split, tokenizer, config, **kw)
  records = inpainting_source(build, split, tokenizer, config, **kw)
  assert type(folder) is InpaintingSource and type(records) is ArrayRecordInpaintingSource  # "auto" format
  assert records.stems == folder.stems
  return folder, records


def assert_same_batches(a, b):
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if isinstance(x[key], np.ndarray):
        assert x[key].dtype == y[key].dtype
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
      else:
        assert x[key] == y[key], key


def test_training_input_same_batches(demo_root, build, clip_tokenizer):
  """The training job's input (global batches by process) from either source."""
  train_input = pytest.importorskip("idmp_jax.train.input")  # Lands with the training job (issue 5).
  folder, records = both(demo_root, build, "train", clip_tokenizer, TRAIN, seed=7)
  kw = dict(global_batch=2, epoch=1, seed=3, process_index=0, process_count=1)
  assert_same_batches(list(train_input.epoch_loader(folder, **kw)), list(train_input.epoch_loader(records, **kw)))


def test_same_batches_for_the_same_seed(demo_root, build, clip_tokenizer):
  folder, records = both(demo_root, build, "train", clip_tokenizer, TRAIN, seed=7)
  kw = dict(batch_size=3, seed=11, num_epochs=2, shard_options=ONE)  # batches cross the epoch boundary
  a, b = list(make_loader(folder, **kw)), list(make_loader(records, **kw))
  assert_same_batches(a, b)
  assert len(a) == 3 and a[0]["pixel_values"].std() > 0.1 and a[0]["region_masks"].any()
  # val with extras and a selection manifest
  selection = {"skimage_chelsea": ["mask_1", "mask_0"], "skimage_hubble": ["mask_1"]}
  folder, records = both(demo_root, build, "val", clip_tokenizer, EVAL, selection=selection)
  kw = dict(batch_size=2, shuffle=False, shard_options=ONE)
  a, b = list(make_loader(folder, **kw)), list(make_loader(records, **kw))
  assert_same_batches(a, b)
  assert a[0]["mask_names"] == [["mask_1", "mask_0"], ["mask_1"]]


def test_through_a_worker_process(demo_root, build, clip_tokenizer):
  folder, records = both(demo_root, build, "test", clip_tokenizer, EVAL, seed=2)
  kw = dict(batch_size=1, seed=4, shard_options=ONE)
  it = iter(make_loader(records, worker_count=1, **kw))  # the source (and its shard readers) pickled
  try:
    assert_same_batches(list(make_loader(folder, **kw)), list(it))
  finally:
    it.close()


def test_processes_read_disjoint_records_covering_the_split(demo_root, build, clip_tokenizer):
  seen = []
  for p in range(2):
    opts = grain.sharding.ShardOptions(p, 2, drop_remainder=False)
    folder, records = both(demo_root, build, "train", clip_tokenizer, EVAL, seed=1)
    kw = dict(batch_size=1, seed=6, shard_options=opts)
    a, b = list(make_loader(folder, **kw)), list(make_loader(records, **kw))
    assert_same_batches(a, b)
    seen.append([s for batch in b for s in batch["stem"]])
    # only the shard file holding this process's records was opened
    assert [r is not None for r in records.records._readers] == [p == 0, p == 1]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == folder.stems


def test_resume_continues_with_the_next_batch_from_either_source(demo_root, build, clip_tokenizer):
  folder, records = both(demo_root, build, "train", clip_tokenizer, TRAIN, seed=5)
  make = lambda src: make_loader(src, batch_size=2, seed=8, num_epochs=None, shard_options=ONE)
  it = iter(make(folder))
  for _ in range(3):  # N = 3 batches: past the first epoch's end
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]  # batches N+1, N+2
  for src in (folder, records):  # a folder state restores into the ArrayRecord loader too
    resumed = iter(make(src))
    resumed.set_state(state)
    assert_same_batches(expected, [next(resumed) for _ in range(2)])


def test_reading_needs_no_tensorflow(build, clip_tokenizer_dir):
  """Training reads the build with grain and our proto decoding: neither TensorFlow nor TFDS is imported."""
  import os
  import subprocess
  import sys
  code = ("import sys; from idmp_jax.data import InpaintingConfig, load_clip_tokenizer\n"
          "from idmp_jax.data.arrayrecord import ArrayRecordInpaintingSource\n"
          f"src = ArrayRecordInpaintingSource({build!r}, 'train', load_clip_tokenizer({clip_tokenizer_dir!r}),"
          " InpaintingConfig(resolution=64))\n"
          "assert src.example(3, 1)['pixel_values'].shape == (64, 64, 3)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
