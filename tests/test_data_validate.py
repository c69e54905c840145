"""validate lists every problem of a dataset with its path, without stopping at the first."""
import json
import os

import numpy as np
from PIL import Image

from data_prep.cli import main
from idmp_jax.data.files import validate_dataset
from tests.data_fixtures import demo_copy, demo_root  # noqa: F401


def test_every_problem_is_listed(demo_copy, tmp_path):
  root = demo_copy
  j = lambda *p: os.path.join(root, *p)
  # a truncated image
  data = open(j("images", "train", "skimage_rocket.jpg"), "rb").read()
  open(j("images", "train", "skimage_rocket.jpg"), "wb").write(data[:len(data) // 3])
  # a missing mask, and a mask whose size differs from its image (same example)
  os.unlink(j("masks", "skimage_astronaut", "mask_2.png"))
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(j("masks", "skimage_astronaut", "mask_3.png"))
  # invalid JSON
  open(j("entities", "skimage_coins", "annotations.json"), "w").write('{"mask_0": {"concept": ')
  # a missing key
  anns = json.load(open(j("entities", "skimage_chelsea", "annotations.json")))
  del anns["mask_1"]["caption"]
  json.dump(anns, open(j("entities", "skimage_chelsea", "annotations.json"), "w"))
  # no masks
  json.dump({}, open(j("entities", "skimage_hubble", "annotations.json"), "w"))
  # an image without annotations, and a missing entity crop
  os.unlink(j("entities", "skimage_motorcycle", "annotations.json"))
  os.unlink(j("entities", "skimage_camera", "mask_1.png"))

  problems, counts = validate_dataset(root)
  found = {(os.path.relpath(p.path, root), p.reason.split(" (")[0]) for p in problems}
  assert found == {
      ("images/train/skimage_rocket.jpg", "unreadable or truncated image"),
      ("masks/skimage_astronaut/mask_2.png", "mask file is missing"),
      ("masks/skimage_astronaut/mask_3.png", "mask size 10x10 differs from the image's 512x512"),
      ("entities/skimage_coins/annotations.json", "invalid JSON"),
      ("entities/skimage_chelsea/annotations.json", "'mask_1': missing key 'caption'"),
      ("entities/skimage_hubble/annotations.json", "no masks"),
      ("entities/skimage_motorcycle/annotations.json",
       f"missing: image {j('images', 'train', 'skimage_motorcycle.jpg')} has no annotations"),
      ("entities/skimage_camera/mask_1.png", "entity crop is missing"),
  }, found
  assert counts["train"] == {"examples": 3, "unannotated": 1}

  out = tmp_path / "problems.json"
  assert main(["validate", "--data-dir", root, "--json", str(out), "--num-workers", "1"]) == 1
  assert len(json.loads(out.read_text())["problems"]) == len(problems)


def test_clean_dataset_passes(demo_root, capsys):
  assert main(["validate", "--data-dir", demo_root]) == 0
  assert "0 problem(s)" in capsys.readouterr().out
