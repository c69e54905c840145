"""The paint command: image + masks + prompts -> painting, prompts.json, grid; bad inputs named."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from idmp_jax import parallel
from idmp_jax.data.files import BadExampleError
from idmp_jax.tasks import paint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("paint_inputs")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "image.png")
  a = np.zeros((60, 80), np.uint8)
  a[5:30, 10:40] = 255
  b = np.zeros((60, 80), np.uint8)
  b[20:55, 30:75] = 255  # Overlaps a: those pixels listen to both prompts.
  Image.fromarray(a).save(d / "boat.png")
  Image.fromarray(b).save(d / "sky.png")
  Image.fromarray(np.zeros((60, 80), np.uint8)).save(d / "empty.png")
  Image.fromarray(np.zeros((30, 80), np.uint8)).save(d / "small.png")
  return d


def config_for(inputs, **overrides):
  c = paint.default_config()
  c.dtype, c.resolution, c.num_inference_steps = "float32", 64, 3
  c.image = str(inputs / "image.png")
  c.masks = f"{inputs / 'boat.png'},{inputs / 'sky.png'}"
  c.prompts = "a red boat|a stormy sky"
  for k, v in overrides.items():
    c[k] = v
  return c


def test_paint_writes_painting_prompts_and_grid(inputs, tmp_path):
  c = config_for(inputs)
  out = paint.run(c, str(tmp_path), parallel.make_mesh(c))
  painting = np.asarray(Image.open(tmp_path / "painting.png"))
  assert painting.shape == (64, 64, 3) and painting.std() > 0
  record = json.load(open(tmp_path / "prompts.json"))
  assert [r["prompt"] for r in record] == ["a red boat", "a stormy sky"] == [r["prompt"] for r in out["prompts"]]
  assert [r["color"] for r in record] == ["red", "green"] and [r["mask"] for r in record] == ["boat", "sky"]
  assert Image.open(tmp_path / "grid.png").size[0] == 128


@pytest.mark.parametrize("overrides,error,match", [
    (dict(masks="{d}/boat.png,{d}/small.png"), BadExampleError, "small.png"),
    (dict(masks="{d}/empty.png"), ValueError, "empty.png"),
    (dict(masks=",".join(["{d}/boat.png"] * 6), prompts="|".join("abcdef")), ValueError, "max_concepts"),
    (dict(prompts="a red boat|"), ValueError, "prompts"),
    (dict(image="{d}/missing.png"), BadExampleError, "missing.png"),
])
def test_bad_inputs_are_named(inputs, tmp_path, overrides, error, match):
  c = config_for(inputs, **{k: v.format(d=inputs) for k, v in overrides.items()})
  with pytest.raises(error, match=match):
    paint.run(c, str(tmp_path), parallel.make_mesh(c))
