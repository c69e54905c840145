"""The LLaVA example against a PyTorch re-statement of the original LlavaDataset.__getitem__."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from idmp_jax.data.inpainting import example_rng
from idmp_jax.data.llava import COLORS, LlavaConfig, LlavaSource, multimask_question
from tests.data_fixtures import demo_root  # noqa: F401
from tests.data_synthetic import box_mask, random_image, write_example


def reference_llava(root, split, stem, rng, *, max_concepts=5, threshold=0.65, shuffle=True, only_gray=False,
                    override_gray=False, remove_intersections=False):
  """The original's __getitem__ with alphas = 1 (every config); torch.randperm/randint -> the same NumPy draws."""
  image = Image.open(os.path.join(root, "images", split, f"{stem}.jpg"))
  if image.mode != "RGB":
    image = image.convert("RGB")
  with open(os.path.join(root, "entities", stem, "annotations.json")) as f:
    anns = json.load(f)
  for name in anns:
    m = Image.open(os.path.join(root, "masks", stem, f"{name}.png"))
    anns[name]["mask"] = torch.from_numpy(np.array(m.convert("L") if m.mode != "L" else m))[None] / 255.0
  anns = dict(sorted(anns.items(), key=lambda x: x[1]["mask"].sum().item(), reverse=True))
  anns = dict(list(anns.items())[:max_concepts])
  colors = dict(list(COLORS.items())[:max_concepts])
  keys = list(colors)
  rand = torch.as_tensor(rng.permutation(len(keys)))[:len(anns)]
  sampled = []
  for i, ann in enumerate(anns.values()):
    sampled.append(keys[rand[i]])
    ann["color_key"], ann["color"] = keys[rand[i]], colors[keys[rand[i]]]
  if shuffle:
    p = torch.as_tensor(rng.permutation(len(anns)))
    anns = dict(zip([list(anns)[i] for i in p], [list(anns.values())[i] for i in p]))
  if threshold is not None:
    to_keep, total = 1, torch.zeros_like(list(anns.values())[0]["mask"])
    for i, ann in enumerate(anns.values()):
      total = torch.max(total, ann["mask"])
      if i == 0:
        continue
      if total.sum().item() / total.numel() <= threshold:
        to_keep += 1
      else:
        break
    anns = dict(list(anns.items())[:to_keep])
    sampled = sampled[:to_keep]
    anns = dict(sorted(anns.items(), key=lambda x: x[1]["mask"].sum().item(), reverse=True))
  if split in ("val", "test") and "red" not in sampled:
    r = int(rng.integers(0, len(anns)))
    anns[list(anns)[r]]["color_key"], anns[list(anns)[r]]["color"] = "red", colors["red"]
  if only_gray:
    if split in ("val", "test"):
      for ann in anns.values():
        if ann["color_key"] == "red":
          ann["color_key"], ann["color"] = "gray", (255, 0, 0) if override_gray else (128, 128, 128)
    else:
      first = list(anns.values())[0]
      first["color_key"], first["color"] = "gray", (128, 128, 128)
  if remove_intersections:
    ks = list(anns)
    for i, ki in enumerate(ks):
      for kj in ks[i + 1:]:
        anns[ki]["mask"] = anns[ki]["mask"] * (1 - anns[kj]["mask"])
  painted = torch.from_numpy(np.array(image)).permute(2, 0, 1).clone()
  for ann in anns.values():
    if only_gray and ann["color_key"] != "gray":
      continue
    # torchvision draw_segmentation_masks(image, mask.bool(), alpha=1.0, colors=color)
    drawn = painted.clone()
    drawn[:, ann["mask"].to(torch.bool)[0]] = torch.tensor(ann["color"], dtype=torch.uint8)[:, None]
    painted = (painted * (1 - 1.0) + drawn * 1.0).to(torch.uint8)
  if shuffle:
    p = torch.as_tensor(rng.permutation(len(anns)))
    anns = dict(zip([list(anns)[i] for i in p], [list(anns.values())[i] for i in p]))
  if split in ("val", "test") or only_gray:
    key = "gray" if only_gray else "red"
    anns = dict(sorted(anns.items(), key=lambda x: x[1]["color_key"] == key))
  if only_gray:
    anns = dict(list(anns.items())[-1:])
  target = "".join(f"<{a['color_key']}>{a['caption']}</{a['color_key']}>" for a in anns.values())
  return {"image": painted.permute(1, 2, 0).numpy(), "target": target,
          "colors": [a["color_key"] for a in anns.values()], "names": list(anns)}


MODES = {
    "multimask": {},
    "1mask": {"only_gray": True},
    "1pred": {"only_gray": True, "override_gray": True},
    "no_threshold_intersections": {"threshold": None, "remove_intersections": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_demo_matches_reference(demo_root, mode):
  kw = MODES[mode]
  for split in ("train", "test"):
    config = LlavaConfig(split=split, only_gray_concept=kw.get("only_gray", False),
                         override_gray=kw.get("override_gray", False), masked_area_threshold=kw.get("threshold", 0.65),
                         remove_intersections=kw.get("remove_intersections", False))
    source = LlavaSource(demo_root, config, seed=11)
    for i, stem in enumerate(source.stems):
      ours = source.example(i, epoch=2)
      ref = reference_llava(demo_root, split, stem, example_rng(11, stem, 2), **kw)
      np.testing.assert_array_equal(ours["image"], ref["image"])
      assert ours["image"].dtype == np.uint8 and ours["image"].shape[2] == 3
      assert (ours["target"], ours["colors"], ours["mask_names"]) == (ref["target"], ref["colors"], ref["names"])
      assert ours["question"] == multimask_question(ref["colors"])
      assert ours["prompt"] == f"{ours['question']} {ours['target']}"


@pytest.fixture(scope="module")
def three_root(tmp_path_factory):
  """Three disjoint masks of 30%, 25%, 20%: any two survive the 0.65 threshold, all three never do."""
  root = tmp_path_factory.mktemp("three")
  h, w = 100, 100
  masks = {"mask_0": box_mask(h, w, 0, 30, 0, 100), "mask_1": box_mask(h, w, 30, 55, 0, 100),
           "mask_2": box_mask(h, w, 55, 75, 0, 100)}
  for split in ("train", "test"):
    write_example(root, split, "three", random_image(np.random.default_rng(1), h, w), masks,
                  captions={"mask_0": "big", "mask_1": "medium", "mask_2": "small"})
  return str(root)


def test_red_check_quirk_and_fix(three_root):
  counts = {"none": 0, "two": 0}
  for seed in range(40):
    ex = LlavaSource(three_root, LlavaConfig(split="test"), seed=seed).example(0)
    ref = reference_llava(three_root, "test", "three", example_rng(seed, "three"))
    assert ex["colors"] == ref["colors"] and ex["target"] == ref["target"]
    assert len(ex["colors"]) == 2
    reds = ex["colors"].count("red")
    counts["none"] += reds == 0
    counts["two"] += reds == 2
    if reds:
      assert ex["colors"][-1] == "red"  # red moved to the end
    fixed = LlavaSource(three_root, LlavaConfig(split="test", red_check_survivors=True), seed=seed).example(0)
    assert fixed["colors"].count("red") == 1 and fixed["colors"][-1] == "red"
  assert counts["none"] > 0 and counts["two"] > 0  # the original's quirk happens, both ways


def test_gray_modes_paint_and_text(three_root):
  rows = {"mask_0": 30, "mask_1": 25, "mask_2": 20}
  original = np.array(Image.open(os.path.join(three_root, "images", "test", "three.jpg")))
  seen_quirk = False
  for seed in range(12):
    train = LlavaSource(three_root, LlavaConfig(split="train", only_gray_concept=True), seed=seed).example(0)
    assert train["colors"] == ["gray"] and train["target"] == f"<gray>{train['captions'][0]}</gray>"
    # only the largest survivor is painted, in gray
    assert np.all(train["image"] == 128, axis=(1, 2)).sum() == rows[train["mask_names"][0]]
    test = LlavaSource(three_root, LlavaConfig(split="test", only_gray_concept=True, override_gray=True),
                       seed=seed).example(0)
    assert not np.all(test["image"] == 128, axis=2).any()
    if test["colors"] == ["gray"]:  # override_gray: painted red, keyed gray
      assert test["question"].endswith("the masks of the colors: gray. ASSISTANT:")
      assert np.all(test["image"] == [255, 0, 0], axis=(1, 2)).sum() >= rows[test["mask_names"][0]]
    else:  # the red-check quirk left no red survivor: nothing is gray, nothing painted
      seen_quirk = True
      np.testing.assert_array_equal(test["image"], original)
  assert seen_quirk


def test_question_templates():
  q = multimask_question(["green", "red"])
  assert q == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions. USER: <image>\nDiscover and "
               "describe the objects hidden behind the masks of the colors: green, red. ASSISTANT:")
  with pytest.raises(ValueError, match="question"):
    LlavaConfig(question="other")


def test_zero_shot_question(demo_root):
  ex = LlavaSource(demo_root, LlavaConfig(split="test", only_gray_concept=True, question="zero_shot")).example(0)
  assert ex["question"].endswith("USER: <image>\nWrite 1 text prompt that describes a reasonable object to be "
                                 "inserted in the gray area. ASSISTANT:")
  assert all(os.path.exists(p) for p in ex["entity_paths"])
  assert ex["noun_chunk_roots"] and ex["concepts"]
