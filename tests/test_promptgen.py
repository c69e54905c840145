"""promptgen_generate on the demo dataset with a tiny random LLaVA-NeXT: answer parsing, files per stem, resume,
input checks, bucketed batches, and the prompts folder the inpainting -Gen run reads."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from idmp_jax import parallel
from idmp_jax.data import llava_processor as lp
from idmp_jax.data.inpainting import InpaintingConfig, InpaintingSource
from idmp_jax.data.llava import ZERO_SHOT_QUESTION, LlavaConfig, LlavaSource
from idmp_jax.models import generation
from idmp_jax.models import llava_next as ln
from idmp_jax.tasks import promptgen_generate as pg
from idmp_jax.tiny_llava import make_tiny_llava
from tests.data_fixtures import demo_copy, demo_root  # noqa: F401  (pytest fixtures)


# ----------------------------------------------------------------------------------------------------------------
# Parsing (SPEC §9 "split", SPEC §6 "first_pair", zero-shot "whole").


def test_parse_ordinary_answer_by_colour_not_position():
  answer = " <red>a red apple</red><green>a green pear</green> "
  assert pg.parse_answer(answer, ["green", "red"], "split") == ["a green pear", "a red apple"]
  assert pg.parse_answer(answer, ["green", "red"], "first_pair") == ["a green pear", "a red apple"]


def test_parse_missing_tags_give_empty():
  for answer in ["<red>a dog", "a dog</red>", "no tags at all", "", "<green>a cat</green>"]:
    assert pg.parse_answer(answer, ["red"], "split") == [""], answer
    assert pg.parse_answer(answer, ["red"], "first_pair") == [""], answer


def test_parse_repeated_tags():
  # The first region wins in both rules.
  assert pg.parse_answer("<red>one</red><red>two</red>", ["red"], "split") == ["one"]
  assert pg.parse_answer("<red>one</red><red>two</red>", ["red"], "first_pair") == ["one"]
  # A second opening tag before the closing one: split cuts at it, first_pair keeps the shortest complete pair.
  assert pg.parse_answer("<red>a<red>b</red>", ["red"], "split") == ["a"]
  assert pg.parse_answer("<red>a<red>b</red>", ["red"], "first_pair") == ["a<red>b"]
  # A closing tag only before the opening one: "both occur", so split returns the rest; first_pair finds no pair.
  assert pg.parse_answer("</red>x<red>y", ["red"], "split") == ["y"]
  assert pg.parse_answer("</red>x<red>y", ["red"], "first_pair") == [""]
  # Two regions of the same colour (the SPEC §8.4 quirk) get the same text.
  assert pg.parse_answer("<red>one</red>", ["red", "red"], "split") == ["one", "one"]


def test_parse_case():
  # §9 lower-cases the whole answer first: upper-case tags and text are found and lower-cased.
  assert pg.parse_answer("<RED>A Big Dog</RED>", ["red"], "split") == ["a big dog"]
  # §6 keeps the case: the tags must match exactly, the text keeps its capitals.
  assert pg.parse_answer("<RED>A Big Dog</RED>", ["red"], "first_pair") == [""]
  assert pg.parse_answer("<red>A Big Dog</red>", ["red"], "first_pair") == ["A Big Dog"]
  assert pg.parse_answer("<red>line one\nline two</red>", ["red"], "first_pair") == ["line one\nline two"]


def test_parse_whole_answer_and_bad_rule():
  assert pg.parse_answer("  A Painting Of A Boat\n", ["gray"], "whole") == ["a painting of a boat"]
  with pytest.raises(ValueError, match="parse rule"):
    pg.parse_answer("x", ["red"], "regex")


def test_gen_colours_reversed():
  assert pg.gen_colors(1) == ["red"]
  assert pg.gen_colors(3) == ["blue", "green", "red"]
  assert pg.gen_colors(5) == ["cyan", "yellow", "blue", "green", "red"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(pg.default_config())


def _config(name, demo_root, tiny_dir, **overrides):  # noqa: F811
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("demo")
  c.model_dir, c.data_dir = tiny_dir, demo_root
  c.max_new_tokens, c.chunk_size = 6, 3
  c.devices = 1
  c.update(overrides)
  return c


def _read(path):
  with open(path) as f:
    return json.load(f)


def _test_stems(root):
  return sorted(f[:-4] for f in os.listdir(os.path.join(root, "images", "test")))


# ----------------------------------------------------------------------------------------------------------------
# End to end with answers made from the question (parsing through the whole task, no compilation).


def _answer_from_question(generator, params, inputs, stop_strings, tokenizer):
  """One answer per row naming each asked colour, in the reverse of the question's order."""
  out = []
  for row in np.asarray(inputs["input_ids"]):
    colors = re.search(r"colors: (.*?)\. ASSISTANT:", tokenizer.decode(row)).group(1).split(", ")
    out.append("".join(f"<{c}>{c.upper()} Thing</{c}>" for c in reversed(colors)) + " and more")
  return out


@pytest.fixture(scope="module")
def scripted_runs(demo_root, tiny_dir, mesh, tmp_path_factory):  # noqa: F811
  mp = pytest.MonkeyPatch()
  mp.setattr(pg, "generate_answers", _answer_from_question)
  runs = {}
  try:
    for name in ("llava_multimask_all", "llava_multimask_gen"):
      workdir = str(tmp_path_factory.mktemp(name))
      runs[name] = (workdir, pg.run(_config(name, demo_root, tiny_dir), workdir, mesh))
  finally:
    mp.undo()
  return runs


def test_multimask_predictions_per_stem(scripted_runs, demo_root):  # noqa: F811
  workdir, summary = scripted_runs["llava_multimask_all"]
  stems = _test_stems(demo_root)
  assert summary["generated"] == len(stems) and sorted(os.listdir(os.path.join(workdir, "predictions"))) == \
      [f"{s}.json" for s in stems]
  assert not os.path.exists(os.path.join(workdir, "prompts"))  # Only the -Gen run writes prompts for inpainting.
  source = LlavaSource(demo_root, LlavaConfig(split="test"), seed=42)
  for i, stem in enumerate(source.stems):
    ex = source.example(i)
    items = _read(os.path.join(workdir, "predictions", f"{stem}.json"))
    assert [x["mask"] for x in items] == ex["mask_names"] and [x["color"] for x in items] == ex["colors"]
    assert [x["prediction"] for x in items] == [f"{c} thing" for c in ex["colors"]]  # Lower-cased (§9).
    assert [x["caption"] for x in items] == ex["captions"]
    gen = _read(os.path.join(workdir, "generations", f"{stem}.json"))
    assert gen["question"] == ex["question"] and gen["answer"].endswith(" and more")


def test_gen_prompts_in_inpainting_mask_order(scripted_runs, demo_root, tmp_path):  # noqa: F811
  workdir, summary = scripted_runs["llava_multimask_gen"]
  prompts_dir = summary["prompts_dir"]
  assert sorted(os.listdir(prompts_dir)) == [f"{s}.json" for s in _test_stems(demo_root)]
  from idmp_jax.data.tokenizer import load_clip_tokenizer
  from idmp_jax.tiny import make_char_clip_tokenizer
  clip_tok = load_clip_tokenizer(make_char_clip_tokenizer(str(tmp_path / "clip_tok")))
  # What inpaint_sample builds with prompts_dir (demo resolution, seed 42, RCA on).
  source = InpaintingSource(demo_root, "test", clip_tok, InpaintingConfig(resolution=64, rca=True, extras=True),
                            seed=42, prompts_dir=prompts_dir)
  for i, stem in enumerate(source.stems):
    ex = source.example(i)
    prompts = _read(os.path.join(prompts_dir, f"{stem}.json"))
    colors = pg.gen_colors(len(ex["mask_names"]))
    assert colors[-1] == "red"
    assert prompts == [f"{c.upper()} Thing" for c in colors]  # One per kept mask, case kept (§6).
    assert ex["texts"] == prompts  # The inpainting example uses them, in its own mask order.
    gen = _read(os.path.join(workdir, "generations", f"{stem}.json"))
    assert gen["masks"] == ex["mask_names"] and gen["colors"] == colors
    items = _read(os.path.join(workdir, "predictions", f"{stem}.json"))
    assert [x["mask"] for x in items] == ex["mask_names"]


def test_predictions_read_by_eval(scripted_runs, demo_root):  # noqa: F811
  from eval.prompts import load_pairs
  workdir, _ = scripted_runs["llava_multimask_all"]
  pairs = load_pairs(os.path.join(workdir, "predictions"))
  assert sorted(pairs) == _test_stems(demo_root)
  assert all(p.endswith(" thing") for items in pairs.values() for _, p in items)


# ----------------------------------------------------------------------------------------------------------------
# Real generation with the tiny random model: two devices, files, resume.


@pytest.fixture(scope="module")
def real_run(demo_root, tiny_dir, mesh, tmp_path_factory):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("real"))
  config = _config("llava_multimask_gen", demo_root, tiny_dir, devices=2, batch_size=1)
  return workdir, config, pg.run(config, workdir, mesh)


def test_real_generation_writes_every_stem(real_run, demo_root):  # noqa: F811
  workdir, _, summary = real_run
  assert summary["devices"] == 2 and summary["generated"] == len(_test_stems(demo_root))
  for stem in _test_stems(demo_root):
    gen = _read(os.path.join(workdir, "generations", f"{stem}.json"))
    prompts = _read(os.path.join(workdir, "prompts", f"{stem}.json"))
    assert len(prompts) == len(gen["masks"]) == len(gen["colors"]) >= 1
    assert prompts == pg.parse_answer(gen["answer"], gen["colors"], "first_pair")
    assert gen["answer"]  # Random weights still say something.


def test_resume_skips_done_stems(real_run, mesh):
  workdir, config, _ = real_run
  stems = sorted(f[:-5] for f in os.listdir(os.path.join(workdir, "predictions")))
  kept = os.path.join(workdir, "predictions", f"{stems[0]}.json")
  before = open(kept, "rb").read(), os.stat(kept).st_mtime_ns
  assert pg.run(config, workdir, mesh)["generated"] == 0
  os.remove(os.path.join(workdir, "predictions", f"{stems[1]}.json"))
  assert pg.run(config, workdir, mesh)["generated"] == 1
  assert (open(kept, "rb").read(), os.stat(kept).st_mtime_ns) == before
  assert os.path.exists(os.path.join(workdir, "predictions", f"{stems[1]}.json"))


def test_bucketed_batch_generates_the_same_tokens(demo_root, tiny_dir):  # noqa: F811
  """Rounded-up lengths, padding views and the moved image_newline index change nothing: same greedy tokens as the
  natural inputs, on two images of different sizes (different view counts)."""
  source = LlavaSource(demo_root, LlavaConfig(split="test"), seed=42)
  examples = [pg.llava_example(source.example(i)) for i in range(2)]
  # A wide image takes fewer views (base + 3 tiles) than the demo's (base + 4): padding views are added.
  examples[1]["image"] = np.asarray(Image.fromarray(examples[1]["image"]).resize((130, 40)))
  tok = pg.LlavaTokenizer(tiny_dir)
  proc_config = lp.ImageProcessorConfig.load(tiny_dir)
  config, params = ln.load_pretrained(tiny_dir)
  bucketed = pg.make_batch(examples, tok, proc_config, config, bucket=64)
  proc = lp.preprocess([e["image"] for e in examples], proc_config)
  seqs = [lp.expand_image_tokens(tok.encode(e["question"]), [s], config) for e, s in zip(examples, proc["image_sizes"])]
  ids, mask = lp.pad_batch(seqs, tok.pad_id, "left")
  natural = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": ln.flatten_pixel_values(proc["pixel_values"], proc["image_sizes"], config),
             "feature_index": ln.image_feature_index(proc["image_sizes"], config)}
  assert bucketed["input_ids"].shape[1] % 64 == 0 and bucketed["input_ids"].shape[1] > ids.shape[1]
  assert len(bucketed["pixel_values"]) > len(natural["pixel_values"])
  gen = generation.Generator(ln.LlavaNextForConditionalGeneration(config),
                             generation.GenerationConfig(max_new_tokens=8, pad_token_id=tok.pad_id))
  a, _ = gen(params, {k: jax.numpy.asarray(v) for k, v in bucketed.items()})
  b, _ = gen(params, {k: jax.numpy.asarray(v) for k, v in natural.items()})
  np.testing.assert_array_equal(a, b)


def test_int8_and_int4_weights_and_cache_generate(tiny_dir, demo_root):  # noqa: F811
  """config.quantize="int8" / "int4" (with kv_cache="int8"): only the decoder layers' kernels become int8 / int4
  (with their scales), and generation runs on them, close to the float model's logits."""
  params = pg.load_params(tiny_dir, "", jnp.float32, "int8")
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  int8 = {k for k, v in flat.items() if np.asarray(v).dtype == np.int8}
  assert int8 and all(k.startswith("language_model/model/layers_") and k.endswith("/kernel") for k in int8)
  assert all(k[:-len("kernel")] + "kernel_scale" in flat for k in int8)
  config, float_params = ln.load_pretrained(tiny_dir)
  source = LlavaSource(demo_root, LlavaConfig(split="test"), seed=42)
  inputs = pg.make_batch([pg.llava_example(source.example(0))], pg.LlavaTokenizer(tiny_dir),
                         lp.ImageProcessorConfig.load(tiny_dir), config, 64)
  model = ln.LlavaNextForConditionalGeneration(config)
  logits = lambda p: model.apply({"params": p}, **{k: jnp.asarray(v) for k, v in inputs.items()})[0]
  err = float(jnp.linalg.norm(logits(params) - logits(float_params)) / jnp.linalg.norm(logits(float_params)))
  assert 0 < err < 2e-2, err  # Lossy, by about the int8 grid's half step.
  gen = generation.Generator(model, generation.GenerationConfig(max_new_tokens=4), cache_dtype=jnp.int8)
  tokens, lengths = gen(jax.device_put(params), {k: jnp.asarray(v) for k, v in inputs.items()})
  assert tokens.shape == (1, 4) and (0 <= tokens).all() and (tokens < config.text_config.vocab_size).all()
  with pytest.raises(ValueError, match="quantize"):
    pg.load_params(tiny_dir, "", jnp.float32, "nf4")
  # int4: the tiny decoder's 32-row kernels are one group each (64 rows on the 7B); lossier than int8.
  params4 = pg.load_params(tiny_dir, "", jnp.float32, "int4")
  flat4 = {"/".join(k): v for k, v in traverse_util.flatten_dict(params4).items()}
  assert {k for k, v in flat4.items() if np.asarray(v).dtype == jnp.int4} == int8
  err4 = float(jnp.linalg.norm(logits(params4) - logits(float_params)) / jnp.linalg.norm(logits(float_params)))
  assert err < err4 < 0.3, (err, err4)
  tokens4, _ = gen(jax.device_put(params4), {k: jnp.asarray(v) for k, v in inputs.items()})
  assert tokens4.shape == (1, 4)


def test_tokenizer_matches_transformers(tiny_dir):
  transformers = pytest.importorskip("transformers")
  ours = pg.LlavaTokenizer(tiny_dir)
  ref = transformers.AutoTokenizer.from_pretrained(tiny_dir)
  for text in [pg.multimask_question(["green", "red"]), ZERO_SHOT_QUESTION,
               "<red>a small boat</red><gray>Odd Text!</gray>"]:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"] and ids[0] == ours.bos_id
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# Inputs checked before compute, naming the path.


def test_missing_model_folder_fails_before_compute(demo_root, tiny_dir, mesh, tmp_path):  # noqa: F811
  c = _config("llava_multimask_all", demo_root, tiny_dir, model_dir=str(tmp_path / "no_such_model"))
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    pg.run(c, str(tmp_path / "w1"), mesh)
  assert not os.path.exists(tmp_path / "w1" / "predictions")
  partial = tmp_path / "partial_model"
  shutil.copytree(tiny_dir, partial)
  os.remove(partial / "tokenizer.json")
  c.model_dir = str(partial)
  with pytest.raises(FileNotFoundError, match=re.escape(str(partial / "tokenizer.json"))):
    pg.run(c, str(tmp_path / "w2"), mesh)


def test_bad_example_and_adapter_fail_before_compute(demo_copy, tiny_dir, mesh, tmp_path):
  stem = _test_stems(demo_copy)[0]
  mask = os.path.join(demo_copy, "masks", stem, sorted(os.listdir(os.path.join(demo_copy, "masks", stem)))[0])
  os.remove(mask)
  c = _config("llava_1mask", demo_copy, tiny_dir)
  with pytest.raises(ValueError, match=re.escape(mask)):
    pg.run(c, str(tmp_path / "w1"), mesh)
  assert not os.path.exists(tmp_path / "w1" / "predictions")
  c.kv_cache = "fp8"
  with pytest.raises(ValueError, match="config.kv_cache"):
    pg.run(c, str(tmp_path / "w1"), mesh)
  c.kv_cache, c.quantize = "", "nf4"
  with pytest.raises(ValueError, match="config.quantize"):
    pg.run(c, str(tmp_path / "w1"), mesh)
  c.quantize = ""
  c.require_adapter = True
  with pytest.raises(ValueError, match="adapter"):
    pg.run(c, str(tmp_path / "w2"), mesh)
  c.adapter = str(tmp_path / "missing_adapter")
  with pytest.raises(FileNotFoundError, match="missing_adapter"):
    pg.run(c, str(tmp_path / "w3"), mesh)
  os.makedirs(c.adapter)  # A folder that is not a peft adapter: named by the file it lacks.
  with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(c.adapter, "adapter_config.json"))):
    pg.run(c, str(tmp_path / "w4"), mesh)

