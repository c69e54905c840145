"""data_prep steps on hand-made inputs: the original's rules checked value by value."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import annotate, caption, text
from data_prep.cli import main
from tests.data_fixtures import demo_root  # noqa: F401


def write_jpg(path, w, h, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)


KOSMOS = {
    "wide.jpg": {"description": "...", "entities": {
        "A Big Thing": {"startend": [0, 1], "bboxes": [[0.0, 0.0, 0.9, 0.8]]},        # 72%: dropped
        "a tiny dot": {"startend": [0, 1], "bboxes": [[0.0, 0.0, 0.05, 0.1]]},        # 0.5%: dropped
        "a Box": {"startend": [0, 1], "bboxes": [[0.1, 0.2, 0.5, 0.8]]},              # x 20..100, y 20..80
        "two boxes": {"startend": [0, 1], "bboxes": [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9],
                                                      [0.0, 0.0, 1.0, 1.0]]},          # third box dropped
    }},
    "tall.jpg": {"description": "...", "entities": {
        "a sliver": {"startend": [0, 1], "bboxes": [[0.51, 0.0, 0.59, 0.5]]},          # 5.1..5.9 -> degenerate
        "a stripe": {"startend": [0, 1], "bboxes": [[0.0, 0.1, 1.0, 0.3]]},
    }},
    "gone.jpg": {"description": "...", "entities": {"x": {"startend": [0, 1], "bboxes": [[0, 0, 0.5, 0.5]]}}},
}


def test_make_masks_and_entities(tmp_path):
  images = tmp_path / "images"
  write_jpg(images / "wide.jpg", 200, 100)
  write_jpg(images / "train" / "tall.jpg", 10, 1000, seed=1)  # found in a split subfolder too
  (tmp_path / "kosmos.json").write_text(json.dumps(KOSMOS))
  args = ["--annotations-path", str(tmp_path / "kosmos.json"), "--image-dir", str(images), "--num-workers", "1"]
  assert main(["make-masks", *args, "--out-dir", str(tmp_path / "masks")]) == 1  # gone.jpg is reported
  assert main(["make-entities", *args, "--out-dir", str(tmp_path / "entities")]) == 1
  assert sorted(os.listdir(tmp_path / "masks" / "wide")) == ["mask_0.png", "mask_1.png"]
  m0 = np.array(Image.open(tmp_path / "masks" / "wide" / "mask_0.png"))
  want = np.zeros((100, 200), np.uint8)
  want[20:80, 20:100] = 255
  np.testing.assert_array_equal(m0, want)
  assert Image.open(tmp_path / "masks" / "wide" / "mask_0.png").mode == "L"
  m1 = np.array(Image.open(tmp_path / "masks" / "wide" / "mask_1.png"))
  want = np.zeros((100, 200), np.uint8)
  want[0:20, 0:40] = 255
  want[50:90, 100:180] = 255
  np.testing.assert_array_equal(m1, want)
  assert sorted(os.listdir(tmp_path / "masks" / "tall")) == ["mask_0.png"]  # the sliver is degenerate
  main(["make-masks", *args[:-2], "--num-workers", "2", "--out-dir", str(tmp_path / "masks2")])  # processes
  for stem in ("wide", "tall"):
    for name in os.listdir(tmp_path / "masks" / stem):
      assert (tmp_path / "masks2" / stem / name).read_bytes() == (tmp_path / "masks" / stem / name).read_bytes()
  assert np.array(Image.open(tmp_path / "masks" / "tall" / "mask_0.png"))[100:300].all()

  anns = json.loads((tmp_path / "entities" / "wide" / "annotations.json").read_text())
  assert anns == {"mask_0": {"concept": "a box"}, "mask_1": {"concept": "two boxes"}}
  image = np.array(Image.open(images / "wide.jpg"))
  np.testing.assert_array_equal(np.array(Image.open(tmp_path / "entities" / "wide" / "mask_0.png")),
                                image[20:80, 20:100])
  collage = np.array(Image.open(tmp_path / "entities" / "wide" / "mask_1.png"))
  assert collage.shape == (40, 160, 3)  # ceil(sqrt(2)) = 2 columns of 80x40 cells
  np.testing.assert_array_equal(collage[:20, :40], image[0:20, 0:40])
  np.testing.assert_array_equal(collage[:, 80:], image[50:90, 100:180])
  assert (collage[20:, :80] == 127).all() and (collage[:20, 40:80] == 127).all()
  # re-running make-entities keeps later steps' keys
  anns["mask_0"]["caption"] = "kept"
  (tmp_path / "entities" / "wide" / "annotations.json").write_text(json.dumps(anns))
  main(["make-entities", *args, "--out-dir", str(tmp_path / "entities")])
  assert json.loads((tmp_path / "entities" / "wide" / "annotations.json").read_text())["mask_0"]["caption"] == "kept"


def test_box_area_rule_uses_float_coordinates():
  assert annotate.box_is_good(100, 100, [0, 0, 0.1, 0.1])          # exactly 1%
  assert not annotate.box_is_good(100, 100, [0, 0, 0.0999, 0.1])
  assert annotate.box_is_good(100, 100, [0, 0, 0.65, 1.0])          # exactly 65%
  assert annotate.entity_boxes(200, 100, [[0.104, 0.2, 0.5, 0.8]]) == [(20, 20, 100, 80)]  # int() truncates


@pytest.mark.parametrize("raw, clean", [
    ("The image shows a red cat sitting.", "a red cat sitting"),
    ("The image shows a red cat sitting.\n", "a red cat sitting. "),  # the final "." survives a trailing space
    ("The image shows a collage featuring two dogs.", "two dogs"),
    ("The image shows a collage of three birds and a tree.", "three birds and a tree"),
    ("The image shows two cats showing a collage.", "a collage"),
    ("The image shows a Café™ — naïve scene!", "a café  naïve scene!"),
    ("", ""),
])
def test_clean_caption(raw, clean):
  assert text.clean_caption(raw) == clean


def _toy_syntax_factory():
  """A rule-based stand-in for spaCy's statistical tagger+parser (en_core_web_sm cannot be installed here): it
  sets POS, heads and dependency labels from a tiny lexicon so that spaCy's REAL English noun_chunks iterator
  runs on them. It tests our step and the spaCy API path, not en_core_web_sm's parses."""
  from spacy.language import Language
  from spacy.tokens import Doc

  if "idmp_toy_syntax" in Language.factories:
    return

  @Language.component("idmp_toy_syntax")
  def toy_syntax(doc):
    words = [t.text for t in doc]
    pos = ["DET" if w.lower() in ("a", "an", "the") else "ADP" if w.lower() in ("of", "on", "in", "with")
           else "ADJ" if w.lower() in ("red", "big", "old", "bright") else "NOUN" for w in words]
    heads, deps = list(range(len(words))), ["dep"] * len(words)
    root = next((i for i in range(len(words)) if pos[i] == "NOUN" and (i + 1 == len(words) or pos[i + 1] != "NOUN")),
                0)  # no noun: the first word is the root, and there is no noun chunk
    for i in range(len(words)):
      if i < root:
        heads[i], deps[i] = root, {"DET": "det", "ADJ": "amod"}.get(pos[i], "compound")
      elif i > root:
        heads[i], deps[i] = (i - 1, "pobj") if pos[i - 1] == "ADP" and pos[i] == "NOUN" else (root, "prep")
    deps[root] = "ROOT"
    return Doc(doc.vocab, words=words, spaces=[bool(t.whitespace_) for t in doc], pos=pos, heads=heads, deps=deps)


def test_noun_chunk_roots_with_a_spacy_pipeline(tmp_path):
  import spacy
  _toy_syntax_factory()
  nlp = spacy.blank("en")
  nlp.add_pipe("idmp_toy_syntax")
  nlp.to_disk(tmp_path / "toy_pipeline")
  entities = tmp_path / "entities"
  concepts = {"a cup of coffee": "cup", "the launch towers": "towers", "red": "red", "a big old boat": "boat"}
  os.makedirs(entities / "img")
  (entities / "img" / "annotations.json").write_text(json.dumps(
      {f"mask_{i}": {"concept": c} for i, c in enumerate(concepts)}))
  assert main(["extract-noun-chunk-roots", "--entities-dir", str(entities),
               "--spacy-model", str(tmp_path / "toy_pipeline")]) == 0
  out = json.loads((entities / "img" / "annotations.json").read_text())
  assert [v["noun_chunk_root"] for v in out.values()] == list(concepts.values())


def test_missing_spacy_model_gives_install_hint(tmp_path, capsys):
  os.makedirs(tmp_path / "entities")
  assert main(["extract-noun-chunk-roots", "--entities-dir", str(tmp_path / "entities"),
               "--spacy-model", "xx_no_such_model"]) == 2
  err = capsys.readouterr().err
  assert "python -m spacy download xx_no_such_model" in err and "Traceback" not in err


def test_llava_annotations_to_folder_and_clean(tmp_path):
  entities = tmp_path / "entities"
  for stem in ("a", "b"):
    os.makedirs(entities / stem)
    (entities / stem / "annotations.json").write_text(json.dumps({"mask_0": {"concept": "c"},
                                                                   "mask_1": {"concept": "d"}}))
  (tmp_path / "p0.json").write_text(json.dumps({"a": {"mask_0": "The image shows a cat.", "mask_1": "Dogs."},
                                                "steps": 1}))
  (tmp_path / "p1.json").write_text(json.dumps({"b": {"mask_0": "The image shows X", "mask_1": "Y."},
                                                "zzz": {"mask_0": "?"}, "steps": 1}))
  assert main(["llava-annotations-to-folder", "--annotations-path", str(tmp_path / "p0.json"),
               str(tmp_path / "p1.json"), "--out-dir", str(entities)]) == 1  # "zzz" has no folder: reported
  assert json.loads((entities / "a" / "llava.json").read_text()) == {"mask_0": "The image shows a cat.",
                                                                    "mask_1": "Dogs."}
  assert main(["llava-annotations-to-entity-annotations", "--entities-dir", str(entities)]) == 0
  assert json.loads((entities / "a" / "annotations.json").read_text()) == {
      "mask_0": {"concept": "c", "caption": "a cat"}, "mask_1": {"concept": "d", "caption": "dogs"}}
  assert json.loads((entities / "b" / "annotations.json").read_text())["mask_0"]["caption"] == "x"


def test_split_from_csv_and_random(tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  names = [f"img{i}.jpg" for i in range(8)]
  for i, n in enumerate(names):
    write_jpg(images / n, 8, 8, seed=i)
    if i != 7:
      os.makedirs(masks / f"img{i}")
  rows = "file_name,url,modifier,split\n" + "".join(
      f"{n},u,Large,{['train', 'train', 'val', 'test', 'train', 'bogus', 'test', 'train'][i]}\n"
      for i, n in enumerate(names))
  (tmp_path / "splits.csv").write_text(rows)
  args = ["split", "--image-dir", str(images), "--masks-dir", str(masks), "--split-csv", str(tmp_path / "splits.csv")]
  assert main(args) == 1  # the bogus split is reported
  listing = {s: sorted(os.listdir(images / s)) for s in ("train", "val", "test", "unannotated")}
  assert listing == {"train": ["img0.jpg", "img1.jpg", "img4.jpg"], "val": ["img2.jpg"],
                     "test": ["img3.jpg", "img6.jpg"], "unannotated": ["img7.jpg"]}
  assert (images / "img5.jpg").exists()
  main(args)  # re-running is harmless
  assert {s: sorted(os.listdir(images / s)) for s in listing} == listing

  shutil.rmtree(images)
  for i, n in enumerate(names):
    write_jpg(images / n, 8, 8, seed=i)
  assert main(["split", "--image-dir", str(images), "--masks-dir", str(masks), "--random-seed", "42",
               "--num-val", "2", "--num-test", "1"]) == 0
  counts = {s: len(os.listdir(images / s)) for s in ("train", "val", "test", "unannotated")}
  assert counts == {"train": 4, "val": 2, "test": 1, "unannotated": 1}


class FakeCaptioner:
  """Stands in for LLaVA: answers from the prompt; can crash after a number of batches (an interrupted run)."""

  def __init__(self, crash_after=None):
    self.calls, self.crash_after, self.seen = 0, crash_after, []

  def __call__(self, images, prompts):
    if self.crash_after is not None and self.calls >= self.crash_after:
      raise KeyboardInterrupt("simulated crash")
    self.calls += 1
    self.seen += prompts
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    return [f"The image shows {p.split('containing ')[1].split(' in a short')[0]}." for p in prompts]


def test_caption_masks_resumes_and_shards(demo_root, tmp_path):
  entities = os.path.join(demo_root, "entities")
  total = sum(len(json.load(open(os.path.join(entities, s, "annotations.json")))) for s in os.listdir(entities))
  backup = tmp_path / "backups"
  args = ["caption-masks", "--entities-dir", entities, "--batch-size", "3", "--backup-dir", str(backup),
          "--save-every", "1"]
  crashing = FakeCaptioner(crash_after=2)
  with pytest.raises(KeyboardInterrupt):
    main(args, captioner=crashing)
  progress = json.loads((backup / "backup_0.json").read_text())
  assert progress["steps"] == 2 and sum(len(v) for k, v in progress.items() if k != "steps") == 6
  resumed = FakeCaptioner()
  assert main(args, captioner=resumed) == 0
  assert len(resumed.seen) == total - 6  # nothing captioned twice
  final = json.loads((backup / "backup_0_final.json").read_text())
  assert sum(len(v) for k, v in final.items() if k != "steps") == total
  assert final["skimage_coffee"]["mask_2"] == "The image shows a spoon."
  assert resumed.seen[0].startswith("A chat between") and resumed.seen[0].endswith(
      "in a short sentence? Ignore the painting style. ASSISTANT: The image shows")
  assert main(args, captioner=FakeCaptioner(crash_after=0)) == 0  # finished: nothing to do

  shards = []
  for p in range(2):
    main(["caption-masks", "--entities-dir", entities, "--num-processes", "2", "--process-id", str(p),
          "--backup-dir", str(tmp_path / "sharded")], captioner=FakeCaptioner())
    shards.append(json.loads((tmp_path / "sharded" / f"backup_{p}_final.json").read_text()))
  stems = [set(s) - {"steps"} for s in shards]
  assert not stems[0] & stems[1] and stems[0] | stems[1] == set(os.listdir(entities))
  assert caption.answer_of("USER: x ASSISTANT: The image shows a dog.") == "The image shows a dog."


def test_demo_dataset_format(demo_root):
  from idmp_jax.data.files import list_split, validate_dataset
  problems, counts = validate_dataset(demo_root)
  assert problems == [] and counts == {"train": {"examples": 4, "unannotated": 0},
                                       "val": {"examples": 2, "unannotated": 0},
                                       "test": {"examples": 2, "unannotated": 0}}
  assert os.listdir(os.path.join(demo_root, "images", "unannotated")) == ["skimage_moon.jpg"]
  assert list_split(demo_root, "test")[0] == ["skimage_camera", "skimage_coffee"]
  anns = json.load(open(os.path.join(demo_root, "entities", "skimage_astronaut", "annotations.json")))
  assert len(anns) == 5 and "an astronaut" not in [a["concept"] for a in anns.values()]  # the 69% box dropped
  assert all(set(a) == {"concept", "noun_chunk_root", "caption"} for a in anns.values())
  assert anns["mask_0"] == {"concept": "the face", "noun_chunk_root": "face",
                            "caption": "a smiling woman with short curly brown hair"}
  for name in anns:
    m = Image.open(os.path.join(demo_root, "masks", "skimage_astronaut", f"{name}.png"))
    assert m.mode == "L" and m.size == (512, 512) and set(np.unique(np.array(m))) == {0, 255}
  parent = os.path.dirname(demo_root)
  assert {"annotations.json", "llava.json", "wikiart_images.csv"} <= set(os.listdir(parent))
  kosmos = json.load(open(os.path.join(parent, "annotations.json")))
  entry = kosmos["skimage_coffee.jpg"]
  for phrase, e in entry["entities"].items():
    a, b = e["startend"]
    assert entry["description"][a:b] == phrase
