"""The paint command: image + masks (+ prompts, or the tiny random prompt generator) -> painting, prompts.json,
grid; bad inputs named."""
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


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  """The tiny random pipeline (NumPy-drawn: no compilation) and LLaVA-NeXT, built once for the module."""
  from idmp_jax.tiny_llava import make_tiny_llava
  from idmp_jax.train.tiny import write_random_pipeline
  d = tmp_path_factory.mktemp("paint_models")
  return dict(model_dir=write_random_pipeline(str(d / "sd")), llava_dir=make_tiny_llava(str(d / "llava")))


def config_for(inputs, tiny_models=None, **overrides):
  c = paint.default_config()
  c.dtype, c.resolution, c.num_inference_steps, c.prompt_max_new_tokens = "float32", 64, 3, 12
  if tiny_models:
    c.model_dir, c.llava_dir = tiny_models["model_dir"], tiny_models["llava_dir"]
  c.image = str(inputs / "image.png")
  c.masks = f"{inputs / 'boat.png'},{inputs / 'sky.png'}"
  c.prompts = "a red boat|a stormy sky"
  for k, v in overrides.items():
    c[k] = v
  return c


def test_paint_writes_painting_prompts_and_grid(inputs, tiny_models, tmp_path):
  c = config_for(inputs, tiny_models)
  out = paint.run(c, str(tmp_path), parallel.make_mesh(c))
  painting = np.asarray(Image.open(tmp_path / "painting.png"))
  assert painting.shape == (64, 64, 3) and painting.std() > 0
  record = json.load(open(tmp_path / "prompts.json"))
  assert [r["prompt"] for r in record] == ["a red boat", "a stormy sky"] == [r["prompt"] for r in out["prompts"]]
  assert [r["color"] for r in record] == ["red", "green"] and [r["mask"] for r in record] == ["boat", "sky"]
  assert Image.open(tmp_path / "grid.png").size[0] == 128


def test_paint_without_prompts_runs_the_prompt_generator(inputs, tiny_models, tmp_path, capsys):
  # Default model folders ("tiny") for the generator, built in the workdir: what a fresh machine runs.
  c = config_for(inputs, tiny_models, prompts="", llava_dir="tiny")
  out = paint.run(c, str(tmp_path), parallel.make_mesh(c))
  printed = capsys.readouterr().out
  assert "prompts are random text" in printed  # The command says the models are tiny random ones.
  assert os.path.isfile(tmp_path / "tiny_llava" / "config.json")
  painting = np.asarray(Image.open(tmp_path / "painting.png"))
  assert painting.shape == (64, 64, 3) and painting.std() > 0
  record = json.load(open(tmp_path / "prompts.json"))
  assert [r["mask"] for r in record] == ["boat", "sky"] and [r["color"] for r in record] == ["red", "green"]
  assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in record)  # One prompt per mask.
  assert record == out["prompts"]
  for r in record:
    assert f"prompt {r['color']} ({r['mask']}): {r['prompt']}" in printed
  assert Image.open(tmp_path / "grid.png").size[0] == 128


def test_prompt_generator_on_int8_weights_and_cache(inputs, tiny_models, tmp_path):
  """llava_quantize / llava_kv_cache: the generator runs on int8 decoder weights and an int8 cache and still writes
  one prompt per mask (random text: the tiny model is random)."""
  import jax
  from idmp_jax import painter as painter_lib
  c = config_for(inputs, tiny_models, prompts="", llava_quantize="int8", llava_kv_cache="int8")
  out = paint.run(c, str(tmp_path), parallel.make_mesh(c))
  assert [r["mask"] for r in out["prompts"]] == ["boat", "sky"]
  assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in out["prompts"])
  writer = painter_lib.Painter.from_config(c, str(tmp_path), log=lambda _: None).prompt_writer
  decoder = jax.tree.leaves(writer.params["language_model"]["model"]["layers_0"])
  assert any(x.dtype == np.int8 for x in decoder) and np.dtype(writer.generator.cache_dtype) == np.int8


@pytest.mark.parametrize("overrides,error,match", [
    (dict(masks="{d}/boat.png,{d}/small.png"), BadExampleError, "small.png"),
    (dict(masks="{d}/empty.png"), ValueError, "empty.png"),
    (dict(masks=",".join(["{d}/boat.png"] * 6), prompts="|".join("abcdef")), ValueError, "max_concepts"),
    (dict(prompts="a red boat|"), ValueError, "prompts"),
    (dict(image="{d}/missing.png"), BadExampleError, "missing.png"),
    (dict(prompts="", llava_quantize="nf4"), ValueError, "config.llava_quantize"),
    (dict(prompts="", llava_kv_cache="fp8"), ValueError, "config.llava_kv_cache"),
])
def test_bad_inputs_are_named(inputs, tmp_path, overrides, error, match):
  c = config_for(inputs, **{k: v.format(d=inputs) for k, v in overrides.items()})
  with pytest.raises(error, match=match):
    paint.run(c, str(tmp_path), parallel.make_mesh(c))


def test_painter_reuses_compiled_sampler_and_reports_progress(inputs, tiny_models, tmp_path):
  from idmp_jax import painter as painter_lib
  p = painter_lib.Painter.load(model_dir=tiny_models["model_dir"], load_prompt_writer=False, workdir=str(tmp_path),
                               dtype="float32", resolution=64, num_inference_steps=3, log=lambda _: None)
  image = Image.open(inputs / "image.png").convert("RGB")
  boat, sky = (np.asarray(Image.open(inputs / f"{n}.png")) for n in ("boat", "sky"))
  ticks = []
  first = p.paint(image, [painter_lib.Mask("boat", "red", boat)], ["a boat"],
                  on_progress=lambda done, total: ticks.append((done, total)))
  total = ticks[-1][1]
  assert ticks[-1] == (total, total) and total >= 3 and all(d <= t for d, t in ticks)  # One tick per UNet call.
  second = p.paint(image, [painter_lib.Mask("sky", "red", sky), painter_lib.Mask("boat", "blue", boat)],
                   ["a sky", "a boat"], guidance=3.0, seed=5)  # New masks, prompts, guidance, seed: same program.
  fn, _ = p._sampler(3, "", True)
  assert fn._cache_size() == 1
  assert not np.allclose(first.image, second.image)
  assert [m.color for m in second.masks] == ["red", "blue"] and second.prompts == ["a sky", "a boat"]


def test_missing_llava_adapter_is_named(inputs, tiny_models, tmp_path):
  c = config_for(inputs, tiny_models, prompts="", llava_adapter=str(tmp_path / "no_adapter"))
  with pytest.raises(FileNotFoundError, match="config.llava_adapter.*no_adapter"):
    paint.run(c, str(tmp_path), parallel.make_mesh(c))
