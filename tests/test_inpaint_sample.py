"""The sampling job end to end on the demo (tiny random pipeline, demo dataset): outputs, resume, bad inputs."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from idmp_jax import parallel
from idmp_jax.tasks import inpaint_sample


@pytest.fixture(scope="module")
def demo_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                           "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.batch_size = 8  # Sharded over the 8 forced host devices.
  c.num_inference_steps = 3
  return c


@pytest.fixture(scope="module")
def demo_run(demo_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  mesh = parallel.make_mesh(demo_config)
  summary = inpaint_sample.run(demo_config, workdir, mesh)
  return workdir, summary, mesh


def test_demo_paints_and_writes_manifest(demo_run):
  workdir, summary, _ = demo_run
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  assert summary["painted"] == len(manifest) >= 2
  for stem, entry in manifest.items():
    image = np.asarray(Image.open(os.path.join(workdir, "images", f"{stem}.png")))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert len(entry["masks"]) == entry["num_masks"] == len(entry["prompts"]) == len(entry["captions"]) >= 1
    for name in entry["masks"]:
      mask = np.asarray(Image.open(os.path.join(workdir, "masks", stem, f"{name}.png")))
      assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert os.path.exists(os.path.join(workdir, "reference", f"{stem}.png"))


def test_resume_skips_written_stems(demo_run, demo_config):
  workdir, _, mesh = demo_run
  stem = sorted(os.listdir(os.path.join(workdir, "images")))[0]
  before = open(os.path.join(workdir, "images", stem), "rb").read()
  summary = inpaint_sample.run(demo_config, workdir, mesh)
  assert summary["painted"] == 0
  assert open(os.path.join(workdir, "images", stem), "rb").read() == before


def test_bad_inputs_fail_before_compute_naming_the_path(demo_run, demo_config, tmp_path):
  workdir, _, mesh = demo_run
  c = demo_config.copy_and_resolve_references()
  c.model_dir = str(tmp_path / "no_such_model")
  with pytest.raises(Exception, match="no_such_model"):
    inpaint_sample.run(c, str(tmp_path / "w1"), mesh)
  c = demo_config.copy_and_resolve_references()
  c.data_dir = os.path.join(workdir, "demo_data", "mm_inp_dataset")
  c.model_dir = os.path.join(workdir, "tiny_pipeline")
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  c.prompts_dir = str(prompts)
  with pytest.raises(Exception, match="prompts"):  # No <stem>.json at all.
    inpaint_sample.run(c, str(tmp_path / "w2"), mesh)
  test_stems = sorted(f[:-4] for f in os.listdir(os.path.join(c.data_dir, "images", "test")))
  for s in test_stems:
    json.dump(["a boat"], open(prompts / f"{s}.json", "w"))
  json.dump([], open(prompts / f"{test_stems[0]}.json", "w"))
  with pytest.raises(ValueError, match=f"{test_stems[0]}.json"):
    inpaint_sample.run(c, str(tmp_path / "w3"), mesh)
  c.prompts_dir = ""
  c.lora = str(tmp_path / "missing_lora.safetensors")
  with pytest.raises(FileNotFoundError, match="missing_lora"):
    inpaint_sample.run(c, str(tmp_path / "w4"), mesh)


def test_sampler_output_evaluates_end_to_end(demo_run, tmp_path, capsys):
  """What the sampler writes (images + manifest) is what `python -m eval inpainting` reads: sampler -> eval -> table."""
  from eval import fid, inpainting
  from tests.test_eval_e2e import TinyInception
  from tests.test_eval_models import random_lpips_files, tiny_clip_folder, tiny_clip_resnet_file
  workdir, _, _ = demo_run
  d = tmp_path / "models"
  d.mkdir()
  backbone, lin = random_lpips_files(d)
  (d / fid.WEIGHTS_NAME).write_bytes(b"stand-in")
  original = fid.load_fid_inception
  fid.load_fid_inception = lambda path, device="cpu": TinyInception().eval().to(device)
  try:
    args = ["--preds", os.path.join(workdir, "images"), "--manifest", os.path.join(workdir, "manifest.json"),
            "--dataset", os.path.join(workdir, "demo_data", "mm_inp_dataset"), "--split", "test",
            "--out", str(tmp_path / "eval"), "--resolution", "64", "--device", "cpu", "--batch-size", "2",
            "--num-workers", "1", "--clip", tiny_clip_folder(d / "clip"), "--clip-iqa",
            tiny_clip_resnet_file(d / "RN50.pt"), "--squeezenet", backbone, "--lpips-lin", lin,
            "--inception", str(d / fid.WEIGHTS_NAME)]
    assert inpainting.main(args) == 0
  finally:
    fid.load_fid_inception = original
  result = json.load(open(tmp_path / "eval" / "metrics.json"))
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  assert result["num_images"] == len(manifest)
  assert result["metrics"]["all"]["num_masks"] == sum(e["num_masks"] for e in manifest.values())
  for key in ("psnr", "lpips", "clip_iqa", "clipsim_i2i", "clipsim_t2i", "fid"):
    assert np.isfinite(result["metrics"]["all"][key]), key
  assert "| " in (tmp_path / "eval" / "metrics.md").read_text()


def test_array_record_build_reads_the_same_split(demo_run, demo_config, tmp_path):
  """config.data_format = "array_record": the build of the same dataset gives the same stems, so a run on the
  folder's workdir finds every painting done (painting from it: the examples are the folder's, value for value,
  by tests/test_tfds_source.py; inpaint_train's losses from it, by tests/test_train.py)."""
  from data_prep import tfds_builder
  workdir, summary, mesh = demo_run
  build = tfds_builder.build_tfds(os.path.join(workdir, "demo_data", "mm_inp_dataset"), str(tmp_path / "tfds"),
                                  progress=False)["build_dir"]
  c = demo_config.copy_and_resolve_references()
  c.data_format, c.array_record_dir, c.data_dir = "array_record", str(tmp_path / "tfds"), str(tmp_path / "unread")
  c.model_dir = os.path.join(workdir, "tiny_pipeline")
  again = inpaint_sample.run(c, workdir, mesh)
  assert again["images"] == summary["painted"] >= 2 and again["painted"] == 0
  assert again["data_dir"] == build
