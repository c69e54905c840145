"""End to end: the demo dataset (data_prep make-demo-dataset) + a folder of predicted PNGs -> eval -> JSON and tables.

Models are tiny and random, saved to local files: CLIP (transformers folder), the CLIP-IQA ResNet (OpenAI layout),
torchvision-layout SqueezeNet + LPIPS lin weights. FID's network is swapped for a small Inception-shaped stand-in
(TF1 resize, convs, 2048-d pool) so the test stays fast; the real architecture is tested in test_eval_models.py.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval import common, fid, inpainting, prompts, table
from idmp_jax.data.inpainting import resize_crop_image
from tests.data_fixtures import clip_tokenizer, clip_tokenizer_dir, demo_root  # noqa: F401  (session fixtures)
from tests.test_eval_models import random_lpips_files, tiny_clip_folder, tiny_clip_resnet_file

RES = 128  # the commands' --resolution: small images keep the test fast


class TinyInception(torch.nn.Module):
  """uint8 images -> 2048 features, with the real preprocessing (truncated uint8 in, TF1 resize to 299)."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(5)
    self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
    self.proj = torch.nn.Conv2d(16, 2048, 1)

  def forward(self, x):
    x = (fid.resize_bilinear_tf1(x.float(), fid.INPUT_SIZE) - 128) / 128
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.proj(torch.relu(self.conv(x)))), 1),
                         1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval_models")
  backbone, lin = random_lpips_files(d)
  inception = d / fid.WEIGHTS_NAME
  inception.write_bytes(b"stand-in: load_fid_inception is patched in these tests")
  return {"clip": tiny_clip_folder(d / "clip-vit-base-patch32"), "clip_iqa": tiny_clip_resnet_file(d / "RN50.pt"),
          "squeezenet": backbone, "lpips_lin": lin, "inception": str(inception), "dir": str(d)}


@pytest.fixture(autouse=True)
def tiny_inception(monkeypatch):
  monkeypatch.setattr(fid, "load_fid_inception", lambda path, device="cpu": TinyInception().eval().to(device))


def _annotations(root, stem):
  with open(os.path.join(root, "entities", stem, "annotations.json")) as f:
    return json.load(f)


def _write_pred(path, root, split, stem, noise, seed):
  """The ground truth after the dataset's resize/crop, plus uniform noise: a stand-in for a sampler's PNG."""
  with Image.open(os.path.join(root, "images", split, f"{stem}.jpg")) as im:
    gt = resize_crop_image(im.convert("RGB"), RES).astype(np.int32)
  rng = np.random.default_rng(seed)
  pred = np.clip(gt + rng.integers(-noise, noise + 1, size=gt.shape), 0, 255).astype(np.uint8)
  Image.fromarray(pred).save(path)
  return gt, pred


def _args(preds, root, out, manifest, models, *extra):
  return ["--preds", str(preds), "--dataset", root, "--split", "train", "--manifest", str(manifest), "--out", str(out),
          "--resolution", str(RES), "--device", "cpu", "--batch-size", "2", "--num-workers", "2",
          "--clip", models["clip"], "--clip-iqa", models["clip_iqa"], "--squeezenet", models["squeezenet"],
          "--lpips-lin", models["lpips_lin"], "--inception", models["inception"], *extra]


def test_inpainting_end_to_end(tmp_path, demo_root, models, capsys):  # noqa: F811
  stems = {"skimage_astronaut": 1, "skimage_rocket": 2, "skimage_motorcycle": 3}  # kept masks per image
  manifest, truth = {}, {}
  preds = tmp_path / "preds"
  preds.mkdir()
  for i, (stem, k) in enumerate(sorted(stems.items())):
    names = list(_annotations(demo_root, stem))[::-1][:k]  # any order: the manifest's is the one used
    anns = _annotations(demo_root, stem)
    manifest[stem] = {"masks": names, "captions": [anns[n]["caption"] for n in names]} if i == 0 else names
    truth[stem] = _write_pred(preds / f"{stem}.png", demo_root, "train", stem, noise=20 + 10 * i, seed=i)
  common.write_json(tmp_path / "manifest.json", manifest)
  out = tmp_path / "eval"

  # a partial run first (two images, two metrics), then the full run computes only what is missing
  first = inpainting.run(inpainting.parse_args(_args(preds, demo_root, out, tmp_path / "manifest.json", models,
                                                     "--metrics", "psnr,fid", "--max-images", "2")))
  assert first["computed_now"] == 2 and set(first["metrics"]["all"]) >= {"psnr", "fid"}
  assert inpainting.main(_args(preds, demo_root, out, tmp_path / "manifest.json", models)) == 0
  shown = capsys.readouterr().out
  result = common.read_json(out / "metrics.json")
  assert result["computed_now"] == 3 and result["num_images"] == 3 and result["num_images_multi"] == 2
  assert result["name"] == "preds"

  # PSNR: one pooled MSE, recomputed here from the files
  def pooled_psnr(keys):
    se = sum(((truth[s][1] / 255.0 - truth[s][0] / 255.0) ** 2).sum() for s in keys)
    return 10 * np.log10(1 / (se / sum(truth[s][0].size for s in keys)))
  all_, multi = result["metrics"]["all"], result["metrics"]["multi"]
  assert all_["psnr"] == pytest.approx(pooled_psnr(stems), abs=1e-4)
  assert multi["psnr"] == pytest.approx(pooled_psnr(["skimage_rocket", "skimage_motorcycle"]), abs=1e-4)
  assert result["by_num_masks"]["3"]["psnr"] == pytest.approx(pooled_psnr(["skimage_motorcycle"]), abs=1e-4)
  assert result["by_num_masks"]["4"]["num_images"] == 0
  for key in ("fid", "lpips", "clip_iqa", "clipsim_i2i", "clipsim_t2i"):
    assert np.isfinite(all_[key]) and np.isfinite(multi[key]), key
  assert all_["num_masks"] == 6 and multi["num_masks"] == 5

  # CLIPSim of one mask, recomputed from the files with the scorer and the SPEC §7 views
  from eval.clipsim import ClipScorer, masked_views
  from idmp_jax.data.inpainting import resize_crop_mask
  entry = np.load(out / "cache" / "skimage_rocket.npz")
  name = manifest["skimage_rocket"][1]
  mask = np.asarray(Image.open(os.path.join(demo_root, "masks", "skimage_rocket", f"{name}.png")))
  mask = torch.from_numpy(resize_crop_mask(mask, RES) > 0)[None]
  with Image.open(preds / "skimage_rocket.png") as im:
    _, pred01 = common.dataset_unit_image(im, RES)
  with Image.open(os.path.join(demo_root, "images", "train", "skimage_rocket.jpg")) as im:
    _, gt01 = common.dataset_unit_image(im, RES)
  scorer = ClipScorer(models["clip"])
  caption = _annotations(demo_root, "skimage_rocket")[name]["caption"]
  pred_emb = scorer.image_embeds(masked_views(pred01, mask))
  assert entry["clipsim_t2i"][1] == pytest.approx(
      scorer.cosine(scorer.text_embeds([f"A padded image of {caption}"]), pred_emb)[0], abs=1e-5)
  assert entry["clipsim_i2i"][1] == pytest.approx(
      scorer.cosine(scorer.image_embeds(masked_views(gt01, mask)), pred_emb)[0], abs=1e-5)
  t2i = np.concatenate([np.load(out / "cache" / f"{s}.npz")["clipsim_t2i"] for s in sorted(stems)])
  assert all_["clipsim_t2i"] == pytest.approx(float(t2i.mean()), abs=1e-6)

  # the paper-shaped Markdown: value (multi-mask value)
  md = (out / "metrics.md").read_text()
  assert md in shown
  lp = f"{100 * all_['lpips']:.2f} ({100 * multi['lpips']:.2f})"
  assert f"| preds | {all_['fid']:.2f} ({multi['fid']:.2f}) | {lp} |" in md
  assert table.main([str(out / "metrics.json"), str(out / "metrics.json")]) == 0
  assert capsys.readouterr().out.count("| preds |") == 2

  # resume: nothing to recompute; a changed prediction is recomputed alone
  again = inpainting.run(inpainting.parse_args(_args(preds, demo_root, out, tmp_path / "manifest.json", models)))
  assert again["computed_now"] == 0 and again["metrics"] == result["metrics"]
  _write_pred(preds / "skimage_astronaut.png", demo_root, "train", "skimage_astronaut", noise=60, seed=9)
  changed = inpainting.run(inpainting.parse_args(_args(preds, demo_root, out, tmp_path / "manifest.json", models)))
  assert changed["computed_now"] == 1 and changed["metrics"]["all"]["psnr"] < all_["psnr"]
  assert changed["metrics"]["multi"] == result["metrics"]["multi"]


def test_inpainting_errors_name_what_is_missing(tmp_path, demo_root, models, capsys):  # noqa: F811
  preds = tmp_path / "preds"
  preds.mkdir()
  common.write_json(tmp_path / "m.json", {"skimage_rocket": ["mask_0"], "skimage_coins": ["mask_0"]})
  base = ["--preds", str(preds), "--dataset", demo_root, "--split", "train", "--manifest", str(tmp_path / "m.json"),
          "--out", str(tmp_path / "out"), "--resolution", str(RES)]
  assert inpainting.main(base + ["--metrics", "clip_iqa", "--clip", models["clip"]]) == 2
  err = capsys.readouterr().err
  assert "clip_iqa" in err and "RN50.pt" in err and "--clip-iqa" in err
  assert inpainting.main(base + ["--metrics", "fid", "--models-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "fid" in err and fid.WEIGHTS_NAME in err
  assert inpainting.main(base + ["--metrics", "psnr"]) == 2
  assert "2 of 2 predictions missing" in capsys.readouterr().err
  _write_pred(preds / "skimage_rocket.png", demo_root, "train", "skimage_rocket", noise=5, seed=0)
  _write_pred(preds / "skimage_coins.png", demo_root, "train", "skimage_coins", noise=5, seed=1)
  common.write_json(tmp_path / "bad.json", {"skimage_rocket": ["mask_9"]})
  bad = base[:7] + [str(tmp_path / "bad.json")] + base[8:]
  assert inpainting.main(bad + ["--metrics", "psnr"]) == 2
  assert "mask_9" in capsys.readouterr().err


def test_inpainting_selection_seed_replays_the_data_pipeline(tmp_path, demo_root, clip_tokenizer):  # noqa: F811
  from idmp_jax.data.inpainting import InpaintingConfig, InpaintingSource
  preds = tmp_path / "preds"
  preds.mkdir()
  source = InpaintingSource(demo_root, "test", clip_tokenizer, InpaintingConfig(resolution=RES, extras=True), seed=3)
  for stem in source.stems:
    _write_pred(preds / f"{stem}.png", demo_root, "test", stem, noise=10, seed=0)
  inpainting.run(inpainting.parse_args(["--preds", str(preds), "--dataset", demo_root, "--selection-seed", "3",
                                        "--resolution", str(RES), "--metrics", "psnr"]))
  for i, stem in enumerate(source.stems):
    cached = np.load(preds / "eval" / "cache" / f"{stem}.npz")
    assert list(cached["masks"]) == source[i]["mask_names"]


def test_prompts_end_to_end(tmp_path, demo_root, models):  # noqa: F811
  anns = {s: _annotations(demo_root, s) for s in ("skimage_camera", "skimage_coffee")}
  preds = {"skimage_camera": [{"mask": "mask_2", "prediction": "a wooden tripod"},
                              {"mask": "mask_0", "prediction": "a woman holding a camera"},
                              {"mask": "mask_1", "prediction": ""}],
           "skimage_coffee": [{"mask": "mask_1", "prediction": "a blue plate"},
                              {"mask": "mask_0", "prediction": "a white cup filled with coffee"}]}
  common.write_json(tmp_path / "preds.json", preds)
  args = ["--predictions", str(tmp_path / "preds.json"), "--dataset", demo_root, "--out", str(tmp_path / "all"),
          "--clip", models["clip"], "--device", "cpu", "--name", "MultiMask-All"]
  result = prompts.run(prompts.parse_args(args))
  pairs = [(s, x["mask"], x["prediction"]) for s in sorted(preds) for x in preds[s]]
  roots = [anns[s][m]["noun_chunk_root"] for s, m, _ in pairs]
  assert roots == ["tripod", "man", "camera", "saucer", "cup"]
  # "man" is found inside "woman": the original's plain substring rule, kept
  assert result["metrics"]["accuracy"] == pytest.approx(3 / 5)
  refs = [anns[s][m]["caption"] for s, m, _ in pairs]
  texts = [p for _, _, p in pairs]
  assert result["metrics"]["bleu1"] == pytest.approx(prompts.bleu(texts, refs, 1))
  assert result["metrics"]["bleu4"] == pytest.approx(prompts.bleu(texts, refs, 4))
  assert result["metrics"]["rouge_l"] == pytest.approx(prompts.rouge_l(texts, refs))
  from eval.clipsim import ClipScorer
  scorer = ClipScorer(models["clip"])
  crops = [Image.open(os.path.join(demo_root, "entities", s, f"{m}.png")) for s, m, _ in pairs]
  want = scorer.cosine(scorer.text_embeds([f"An image of {p}" for p in texts]), scorer.image_embeds(crops))
  assert result["metrics"]["clipsim"] == pytest.approx(float(np.mean(want)), abs=1e-6)
  assert result["num_predictions"] == 5 and result["empty_predictions"] == 1
  cache = tmp_path / "all" / "cache" / "clipsim.jsonl"
  assert len(cache.read_text().splitlines()) == 5

  # LastPred: each stem's last item; its CLIP scores come from the cache of the same --out
  last = prompts.run(prompts.parse_args(args[:5] + [str(tmp_path / "all")] + args[6:-1] + ["MultiMask-LastPred",
                                                                                          "--last-only"]))
  assert last["num_predictions"] == 2 and last["metrics"]["accuracy"] == pytest.approx(0.5)
  assert last["metrics"]["clipsim"] == pytest.approx((want[2] + want[4]) / 2, abs=1e-6)
  assert len(cache.read_text().splitlines()) == 5
  md = table.markdown([result, last])
  assert md.splitlines()[0] == "|  | Accuracy (%) | BLEU@1 | BLEU@4 | ROUGE-L | CLIPSim |"
  assert md.splitlines()[2].startswith("| MultiMask-All | 60.00 |")
  assert md.splitlines()[3].startswith("| MultiMask-LastPred | 50.00 |")


def test_prompts_needs_the_clip_folder(tmp_path, demo_root, capsys):  # noqa: F811
  common.write_json(tmp_path / "p.json", {"skimage_camera": [{"mask": "mask_0", "prediction": "a man"}]})
  assert prompts.main(["--predictions", str(tmp_path / "p.json"), "--dataset", demo_root, "--out",
                       str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "clipsim" in err and "clip-vit-base-patch32" in err and "--clip" in err
