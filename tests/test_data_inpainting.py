"""The inpainting example, value by value against a PyTorch/PIL re-statement of the original __getitem__."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idmp_jax.data import files
from idmp_jax.data.inpainting import (InpaintingConfig, InpaintingSource, example_rng, pack_prompts,
                                      resize_geometry, selection_of, threshold_count, torch_nearest_index,
                                      trim_lengths)
from tests.data_fixtures import clip_tokenizer, clip_tokenizer_dir, demo_root  # noqa: F401
from tests.data_synthetic import box_mask, random_image, write_example


def reference_example(root, split, stem, hf_tokenizer, rng, *, max_concepts=5, threshold=0.65, shuffle=True,
                      resolution=512, freestyle=False, drop_p=0.0):
  """The original InpaintingDataset.__getitem__ (torchvision 0.19 transforms restated with PIL and torch ops;
  torch.randperm / torch.rand replaced by the same NumPy draws as ours, in the same order)."""
  root = str(root)
  image = Image.open(os.path.join(root, "images", split, f"{stem}.jpg"))
  if image.mode != "RGB":
    image = image.convert("RGB")
  w, h = image.size
  # transforms.Resize(resolution, BILINEAR) on a PIL image, then CenterCrop, ToTensor, Normalize
  if w <= h:
    size = (resolution, int(resolution * h / w))
  else:
    size = (int(resolution * w / h), resolution)
  if size != (w, h):
    image = image.resize(size, Image.BILINEAR)
  top, left = int(round((size[1] - resolution) / 2.0)), int(round((size[0] - resolution) / 2.0))
  image = image.crop((left, top, left + resolution, top + resolution))
  pixel_values = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)
  pixel_values = pixel_values.sub(torch.tensor([0.5]).view(-1, 1, 1)).div(torch.tensor([0.5]).view(-1, 1, 1))

  with open(os.path.join(root, "entities", stem, "annotations.json")) as f:
    anns = json.load(f)
  for name in anns:
    m = Image.open(os.path.join(root, "masks", stem, f"{name}.png"))
    if m.mode != "L":
      m = m.convert("L")
    anns[name]["mask"] = torch.from_numpy(np.array(m))[None] / 255.0
  anns = dict(sorted(anns.items(), key=lambda x: x[1]["mask"].sum().item(), reverse=True))
  anns = dict(list(anns.items())[:max_concepts])
  if shuffle:
    perm = torch.as_tensor(rng.permutation(len(anns)))
    anns = dict(zip([list(anns)[i] for i in perm], [list(anns.values())[i] for i in perm]))
  for ann in anns.values():  # transforms.Resize(resolution, NEAREST) on a tensor + CenterCrop
    m = F.interpolate(ann["mask"][None], size=(size[1], size[0]), mode="nearest")[0]
    ann["mask"] = m[:, top:top + resolution, left:left + resolution]
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
  masks_list = [a["mask"] for a in anns.values()]
  masks = torch.stack(masks_list)
  out = {"pixel_values": pixel_values, "masks": torch.any(masks, dim=0).float()}
  if freestyle:
    background = torch.all(masks == 0, dim=0)
    masks[background[None].expand(len(masks), -1, -1, -1)] = 1
    layout = torch.cat((torch.ones(background.shape).unsqueeze(0).float(), masks), dim=0).squeeze(1)
    out["layout"] = F.pad(layout, (0, 0, 0, 0, 0, max_concepts + 1 - layout.shape[0]), value=0).long()
  texts = [anns[a]["caption"] for a in anns]
  if len(texts) == 1 and drop_p > 0 and rng.random() < drop_p:
    texts = [""]
  enc = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
  lengths = enc["attention_mask"].sum(dim=1) - 2
  budget = 77 - 2 - (0 if freestyle else len(texts))
  while lengths.sum() > budget and lengths.max() != lengths.min():
    lengths[torch.argmax(lengths)] -= 1
  while lengths.sum() > budget:
    lengths -= 1
  sel = torch.arange(77)[None].expand(len(texts), -1)
  sel = (sel > 0) & (sel <= lengths[:, None])
  ids = torch.empty(0, dtype=torch.long)
  for i in range(len(texts)):
    ids = torch.cat((ids, enc.input_ids[i][sel[i]]))
    if not freestyle:
      ids = torch.cat((ids, torch.tensor([hf_tokenizer.convert_tokens_to_ids(".</w>")])))
  ids = torch.cat((torch.tensor([hf_tokenizer.bos_token_id]), ids, torch.tensor([hf_tokenizer.eos_token_id])))
  out["input_ids"] = F.pad(ids, (0, 77 - len(ids)), value=hf_tokenizer.pad_token_id)
  if freestyle:
    region = torch.arange(1, len(texts) + 1).repeat_interleave(lengths)
    region = torch.cat((torch.tensor([0]), region, torch.tensor([0])))
    out["token_region"] = F.pad(region, (0, 77 - len(region)), value=0)
  out["masked"] = pixel_values * (1 - out["masks"].expand_as(pixel_values))
  out["all_masks"], out["texts"], out["names"] = masks_list, texts, list(anns)
  return out


def assert_matches_reference(ours, ref, rca):
  np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"].permute(1, 2, 0).numpy())
  np.testing.assert_array_equal(ours["mask"], ref["masks"].permute(1, 2, 0).numpy())
  np.testing.assert_array_equal(ours["masked_pixel_values"], ref["masked"].permute(1, 2, 0).numpy())
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
  assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == (77,)
  assert int(ours["num_masks"]) == len(ref["all_masks"])
  if rca:
    np.testing.assert_array_equal(ours["token_region"], ref["token_region"].numpy())
    np.testing.assert_array_equal(ours["region_masks"], ref["layout"].numpy())
  if "masks" in ours:
    k = len(ref["all_masks"])
    np.testing.assert_array_equal(ours["masks"][:k], torch.cat(ref["all_masks"]).numpy())
    assert not ours["masks"][k:].any()
    assert ours["texts"] == ref["texts"] and ours["mask_names"] == ref["names"]


@pytest.fixture(scope="module")
def edge_root(tmp_path_factory):
  """Hand-made examples: area ties, 7 masks, an early threshold stop, very long captions, odd sizes whose crop
  offset is x.5 (round-half-even), upscaling and a no-resize image."""
  root = tmp_path_factory.mktemp("edge")
  rng = np.random.default_rng(0)
  long = "a very long and detailed description of a small red wooden boat floating on a calm blue lake " * 2
  h, w = 300, 451  # upscaled; 769 wide after resize: crop offset 128.5 -> 128
  write_example(root, "test", "ties", random_image(rng, h, w),
                {f"mask_{k}": box_mask(h, w, 10 + 20 * k, 60 + 20 * k, 30 * k, 30 * k + 100) for k in range(7)},
                captions={f"mask_{k}": long[:40 + 30 * k] for k in range(7)})
  h, w = 640, 903  # 903*512/640 = 722.4 -> 722: offset 105; height 512, no crop
  write_example(root, "test", "threshold", random_image(rng, h, w),
                {"mask_0": box_mask(h, w, 0, 400, 0, 600), "mask_1": box_mask(h, w, 300, 640, 400, 903),
                 "mask_2": box_mask(h, w, 0, 50, 850, 903), "mask_3": box_mask(h, w, 600, 640, 0, 40)})
  h, w = 600, 350  # tall; 512 x 877 after resize: offset 182.5 -> 182
  write_example(root, "test", "tall", random_image(rng, h, w),
                {"mask_0": box_mask(h, w, 100, 200, 50, 300), "mask_1": box_mask(h, w, 0, 600, 0, 10)},
                captions={"mask_0": long * 2, "mask_1": "a thin line"})
  h, w = 512, 512
  write_example(root, "test", "square", random_image(rng, h, w), {"mask_0": box_mask(h, w, 100, 300, 100, 300)},
                captions={"mask_0": "a single box"})
  return str(root)


def test_nearest_rule_matches_torch_and_layers():
  from idmp_jax.models.layers import torch_nearest_indices
  for n_in, n_out in [(300, 512), (451, 769), (1000, 587), (640, 512), (903, 722), (512, 512), (7, 3)]:
    x = torch.arange(n_in, dtype=torch.float32)[None, None]
    want = F.interpolate(x, size=n_out, mode="nearest")[0, 0].numpy().astype(np.int64)
    np.testing.assert_array_equal(torch_nearest_index(n_in, n_out), want)
    np.testing.assert_array_equal(torch_nearest_indices(n_in, n_out), want)


def test_resize_geometry_round_half_even():
  assert resize_geometry(300, 451, 512) == (512, 769, 0, 128)   # 128.5 -> 128
  assert resize_geometry(600, 350, 512) == (877, 512, 182, 0)   # 182.5 -> 182
  assert resize_geometry(400, 600, 512) == (512, 768, 0, 128)
  assert resize_geometry(512, 512, 512) == (512, 512, 0, 0)


@pytest.mark.parametrize("rca", [False, True])
def test_demo_matches_reference(demo_root, clip_tokenizer, rca):
  for split in ("train", "val", "test"):
    config = InpaintingConfig(rca=rca, extras=split != "train")
    source = InpaintingSource(demo_root, split, clip_tokenizer, config, seed=3)
    for i, stem in enumerate(source.stems):
      ours = source.example(i, epoch=1)
      ref = reference_example(demo_root, split, stem, clip_tokenizer.hf, example_rng(3, stem, 1), freestyle=rca)
      assert_matches_reference(ours, ref, rca)
      if config.extras:
        assert ours["stem"] == stem and ours["captions"] == ref["texts"]


@pytest.mark.parametrize("rca", [False, True])
def test_edge_cases_match_reference(edge_root, clip_tokenizer, rca):
  source = InpaintingSource(edge_root, "test", clip_tokenizer, InpaintingConfig(rca=rca, extras=True))
  assert source.stems == ["square", "tall", "threshold", "ties"]
  for seed in range(2):
    source.seed = seed
    for i, stem in enumerate(source.stems):
      ref = reference_example(edge_root, "test", stem, clip_tokenizer.hf, example_rng(seed, stem), freestyle=rca)
      assert_matches_reference(source.example(i), ref, rca)


def test_sort_truncate_and_threshold_by_hand(edge_root, clip_tokenizer):
  # no shuffle: area order, ties in annotation order, 7 -> 5
  config = InpaintingConfig(shuffle_concepts=False, masked_area_threshold=None, extras=True)
  ex = InpaintingSource(edge_root, "test", clip_tokenizer, config).example(3)
  assert ex["mask_names"] == ["mask_0", "mask_1", "mask_2", "mask_3", "mask_4"]  # equal areas: file order
  # threshold, recomputed by hand from the unthresholded, unshuffled masks of the same example
  full = InpaintingSource(edge_root, "test", clip_tokenizer,
                          InpaintingConfig(shuffle_concepts=False, masked_area_threshold=None, extras=True))
  fm = full.example(2)["masks"]
  union, expected = np.zeros_like(fm[0]), 1
  for k in range(4):
    union = np.maximum(union, fm[k])
    if k and union.mean() > 0.65:
      break
    expected += k > 0
  kept = InpaintingSource(edge_root, "test", clip_tokenizer,
                          InpaintingConfig(shuffle_concepts=False, extras=True)).example(2)
  assert len(kept["mask_names"]) == expected == threshold_count(list(fm), 0.65) == 1  # stops at the 2nd
  # the rule itself on tiny masks: first kept always, stop at the first that exceeds
  a = np.zeros((10, 10), np.float32)
  big, small = a.copy(), a.copy()
  big[:9] = 1
  small[9, :2] = 1
  assert threshold_count([big, small], 0.65) == 1
  assert threshold_count([small, small, big, small], 0.65) == 2


def test_pack_prompts_budget_arithmetic():
  ids = lambda n, base: [49406] + list(range(base, base + n)) + [49407]
  kw = dict(bos_id=49406, eos_id=49407, pad_id=0, period_id=269)
  # fits: no trimming; periods after each prompt without RCA
  out, region, lengths = pack_prompts([ids(3, 100), ids(2, 200)], rca=False, **kw)
  assert lengths == [3, 2]
  assert out[:9].tolist() == [49406, 100, 101, 102, 269, 200, 201, 269, 49407] and not out[9:].any()
  out, region, lengths = pack_prompts([ids(3, 100), ids(2, 200)], rca=True, **kw)
  assert out[:7].tolist() == [49406, 100, 101, 102, 200, 201, 49407]
  assert region[:8].tolist() == [0, 1, 1, 1, 2, 2, 0, 0] and not region[8:].any()
  # over budget, unequal: decrement the FIRST largest until equal or fitting. RCA budget 75.
  assert trim_lengths([50, 30, 10], 75) == [35, 30, 10]
  assert trim_lengths([40, 40, 10], 75) == [32, 33, 10]   # ties: the first argmax goes first, alternating
  # all equal and still over: all decrement together (may undershoot the budget)
  assert trim_lengths([30, 30, 30], 75) == [25, 25, 25]
  assert trim_lengths([75, 75, 75, 75, 75], 70) == [14, 14, 14, 14, 14]
  assert trim_lengths([75, 75, 75, 75, 75], 75 - 5) == [14] * 5
  # non-RCA budget: 77 - 2 - K
  out, _, lengths = pack_prompts([ids(75, 1), ids(10, 1000)], rca=False, **kw)
  assert lengths == [63, 10]  # budget 77 - 2 - 2 = 73
  assert out.tolist() == [49406] + list(range(1, 64)) + [269] + list(range(1000, 1010)) + [269, 49407]
  out, region, lengths = pack_prompts([ids(75, 1), ids(75, 1000)], rca=True, **kw)
  assert lengths == [37, 37]  # budget 75: equal lengths go down together, 74 <= 75
  assert region.tolist() == [0] + [1] * 37 + [2] * 37 + [0, 0]
  # a dropped caption: [BOS, ".", EOS, 0...] without RCA (quirk), [BOS, EOS, 0...] with RCA
  out, _, _ = pack_prompts([[49406, 49407]], rca=False, **kw)
  assert out[:4].tolist() == [49406, 269, 49407, 0]
  out, region, _ = pack_prompts([[49406, 49407]], rca=True, **kw)
  assert out[:3].tolist() == [49406, 49407, 0] and not region.any()


def test_dropout_only_single_caption(demo_root, clip_tokenizer, edge_root):
  config = InpaintingConfig(drop_caption_probability=0.5, extras=True)
  src = InpaintingSource(edge_root, "test", clip_tokenizer, config)
  dropped = 0
  for epoch in range(40):
    ex = src.example(0, epoch)  # "square": one mask
    if ex["texts"] == [""]:
      dropped += 1
      assert ex["input_ids"][:4].tolist() == [49406, 269, 49407, 0] and ex["captions"] == ["a single box"]
  assert 8 < dropped < 32  # about half
  multi = src.example(3, 0)
  assert "" not in multi["texts"]


def test_reproducible_and_epoch_dependent(demo_root, clip_tokenizer):
  src = InpaintingSource(demo_root, "train", clip_tokenizer, InpaintingConfig(extras=True), seed=7)
  astro = src.stems.index("skimage_astronaut")
  a, b = src.example(astro, 0), src.example(astro, 0)
  assert a["mask_names"] == b["mask_names"]
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  orders = {tuple(src.example(astro, e)["mask_names"]) for e in range(8)}
  assert len(orders) > 1


def test_selection_manifest_and_prompts_dir(demo_root, clip_tokenizer, tmp_path):
  config = InpaintingConfig(rca=True, extras=True)
  src = InpaintingSource(demo_root, "test", clip_tokenizer, config, seed=1)
  manifest = dict(selection_of(src.example(i)) for i in range(len(src)))
  path = tmp_path / "selection.json"
  path.write_text(json.dumps({k: v[::-1] for k, v in manifest.items()}))
  replay = InpaintingSource(demo_root, "test", clip_tokenizer, config, seed=999, selection=str(path))
  for i, stem in enumerate(replay.stems):
    assert replay.example(i)["mask_names"] == manifest[stem][::-1]
  with pytest.raises(files.BadExampleError, match="no entry for stem"):
    InpaintingSource(demo_root, "test", clip_tokenizer, config, selection={}).example(0)

  prompts = tmp_path / "prompts"
  prompts.mkdir()
  for stem in src.stems:
    (prompts / f"{stem}.json").write_text(json.dumps(["a generated prompt"]))
  gen = InpaintingSource(demo_root, "test", clip_tokenizer, config, seed=1, prompts_dir=str(prompts)).example(0)
  base = src.example(0)
  assert gen["texts"] == ["a generated prompt"] + base["captions"][1:]  # zip: extra masks keep their caption
  assert gen["captions"] == base["captions"]
  with pytest.raises(FileNotFoundError, match="prompts folder"):
    InpaintingSource(demo_root, "test", clip_tokenizer, config, prompts_dir=str(tmp_path / "nope"))


def test_max_concepts_one_picks_uniformly(edge_root, clip_tokenizer):
  src = InpaintingSource(edge_root, "test", clip_tokenizer, InpaintingConfig(max_concepts=1, extras=True))
  picks = {src.example(3, e)["mask_names"][0] for e in range(60)}
  assert len(picks) >= 5  # any of the 7 masks, not only the largest
  ex = src.example(3, 0)
  assert ex["masks"].shape == (1, 512, 512) and int(ex["num_masks"]) == 1
