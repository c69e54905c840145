"""build-tfds: the records (file bytes and annotations), TFDS metadata, bad records, resume per shard, processes."""
import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import cli, tfds_builder  # noqa: E402
from idmp_jax.data import arrayrecord, files  # noqa: E402
from tests.data_fixtures import demo_copy, demo_root  # noqa: E402,F401


def split_records(build_dir, split):
  """The serialised records of a split, in order (grain, no TensorFlow)."""
  import grain
  return list(grain.sources.ArrayRecordDataSource(arrayrecord.shard_instructions(build_dir, split)))


@pytest.fixture(scope="module")
def built(demo_root, tmp_path_factory):
  summary = tfds_builder.build_tfds(demo_root, tmp_path_factory.mktemp("tfds"), examples_per_shard=3,
                                    progress=False)
  assert summary["finished"] and not summary["left_out"]
  return summary["build_dir"]


def test_records_hold_the_files_unchanged(demo_root, built):
  layout = files.Layout(demo_root)
  for split in files.SPLITS:
    stems, _ = files.list_split(demo_root, split)
    records = [arrayrecord.parse_tf_example(r) for r in split_records(built, split)]
    assert [r["stem"][0].decode() for r in records] == stems  # sorted stems: index i = folder source's i
    assert arrayrecord.read_records_file(built)[split]["stems"] == stems
    for stem, r in zip(stems, records):
      assert r["image"][0] == open(layout.image(split, stem), "rb").read()  # the JPEG bytes, not re-encoded
      anns = files.read_annotations(layout.annotations(stem))
      assert [n.decode() for n in r["entities/name"]] == list(anns)  # annotation order
      for key in files.ANNOTATION_KEYS:
        assert [v.decode() for v in r[f"entities/{key}"]] == [a[key] for a in anns.values()]
      assert r["entities/mask"] == [open(layout.mask(stem, n), "rb").read() for n in anns]


def test_tfds_reads_the_build(built):
  builder = tfds.builder_from_directory(built)
  info = builder.info
  assert builder.name == "idmp_inpainting" and str(info.version) == "1.0.0" and "1.0.0" in info.release_notes
  assert info.file_format.value == "array_record" and "Fanelli" in info.citation and info.disable_shuffling
  assert {s: info.splits[s].num_examples for s in files.SPLITS} == {"train": 4, "val": 2, "test": 2}
  assert info.splits["train"].num_shards == 2  # 4 records, 3 per shard -> 2 shards of 2
  assert set(info.features["entities"].feature) == {"name", "mask", "concept", "noun_chunk_root", "caption"}
  ex = builder.as_data_source("val")[1]  # TFDS's own NumPy decoding agrees with ours
  stem, image, anns, masks = arrayrecord.ArrayRecordInpaintingSource(built, "val", None).read(1)
  assert ex["stem"].decode() == stem
  np.testing.assert_array_equal(ex["image"], np.asarray(image))
  np.testing.assert_array_equal(ex["entities"]["mask"][0][..., 0], masks["mask_0"])
  assert [c.decode() for c in ex["entities"]["caption"]] == [a["caption"] for a in anns.values()]


def test_tfds_download_and_prepare_writes_the_same_records(demo_root, built, tmp_path):
  builder = tfds_builder.IdmpInpainting(data_dir=tmp_path)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=demo_root))
  for split in files.SPLITS:
    assert split_records(os.fspath(builder.data_path), split) == split_records(built, split)


def test_bad_records_are_reported_and_left_out(demo_copy, tmp_path, capsys):
  image = os.path.join(demo_copy, "images", "train", "skimage_coins.jpg")
  data = open(image, "rb").read()
  open(image, "wb").write(data[:len(data) // 2])  # truncated JPEG
  mask = os.path.join(demo_copy, "masks", "skimage_hubble", "mask_1.png")
  Image.new("L", (7, 5)).save(mask)  # wrong size
  out = tmp_path / "out"
  assert cli.main(["build-tfds", f"--data-dir={demo_copy}", f"--out={out}", "--examples-per-shard=3"]) == 1
  err = capsys.readouterr().err
  assert "leaving out train/skimage_coins" in err and "truncated" in err
  assert "leaving out val/skimage_hubble" in err and "mask size 7x5 differs" in err
  build = arrayrecord.find_build(out)
  records = arrayrecord.read_records_file(build)
  assert "skimage_coins" not in records["train"]["stems"] and len(records["train"]["stems"]) == 3
  assert [b["stem"] for b in records["val"]["left_out"]] == ["skimage_hubble"]
  assert records["val"]["left_out"][0]["path"] == mask
  assert len(split_records(build, "train")) == 3 and len(split_records(build, "val")) == 1
  assert not glob.glob(os.path.join(build, "*.incomplete"))


def test_resume_rebuilds_only_missing_shards(demo_root, built, tmp_path):
  out = tmp_path / "out"
  first = tfds_builder.build_tfds(demo_root, out, examples_per_shard=3, progress=False)
  build = first["build_dir"]
  state = os.path.join(build, "build_state", "train-00001-of-00002.json")
  shard = os.path.join(build, "idmp_inpainting-train.array_record-00001-of-00002")
  os.remove(state)  # as if killed while writing shard 1: its entry is missing, a partial file lies around
  open(shard + ".incomplete", "wb").write(b"half")
  again = tfds_builder.build_tfds(demo_root, out, examples_per_shard=3, progress=False)
  assert (again["shards_written"], again["shards_already_done"], again["records_written"]) == (1, 3, 2)
  assert again["finished"] and not os.path.exists(shard + ".incomplete")
  for split in files.SPLITS:
    assert split_records(build, split) == split_records(built, split)
  with pytest.raises(ValueError, match="examples-per-shard"):
    tfds_builder.build_tfds(demo_root, out, examples_per_shard=2, progress=False)


def test_processes_split_the_shards(demo_root, built, tmp_path):
  out = tmp_path / "out"
  p0 = tfds_builder.build_tfds(demo_root, out, examples_per_shard=3, num_processes=2, process_id=0,
                               progress=False)
  assert not p0["finished"] and not os.path.exists(os.path.join(p0["build_dir"], "dataset_info.json"))
  p1 = tfds_builder.build_tfds(demo_root, out, examples_per_shard=3, num_processes=2, process_id=1,
                               progress=False)
  assert p1["finished"] and p0["shards_written"] + p1["shards_written"] == 4  # train 2 + val 1 + test 1
  assert p0["records_written"] + p1["records_written"] == 8
  for split in files.SPLITS:
    assert split_records(p1["build_dir"], split) == split_records(built, split)
  counts = json.load(open(os.path.join(p1["build_dir"], "dataset_info.json")))["splits"]
  assert [int(n) for n in counts[0]["shardLengths"]] == [2, 2]


def test_parse_tf_example_matches_protobuf():
  from tensorflow_datasets.proto import tf_example_pb2 as example_pb2  # TFDS's copy of TensorFlow's proto
  ex = example_pb2.Example()
  ex.features.feature["a/b"].bytes_list.value.extend([b"x" * 300, b"", "é".encode()])
  ex.features.feature["stem"].bytes_list.value.append(b"s")
  assert arrayrecord.parse_tf_example(ex.SerializeToString()) == {"a/b": [b"x" * 300, b"", "é".encode()],
                                                                 "stem": [b"s"]}
  # a record written by TFDS with a real image round-trips through our parser
  buf = io.BytesIO()
  Image.new("RGB", (3, 2), (9, 8, 7)).save(buf, "JPEG")
  data = tfds_builder.features().serialize_example(
      {"stem": "s", "image": buf.getvalue(), "entities": {k: [] for k in arrayrecord.ENTITY_KEYS}})
  assert arrayrecord.parse_tf_example(data)["image"] == [buf.getvalue()]
