"""`python -m eval.inpainting`: the multi-mask inpainting table (SPEC §7) from images on disk.

  python -m eval.inpainting --preds OUT/sd2_inp_rca_ft --dataset data/mm_inp_dataset --manifest OUT/manifest.json \
      --models-dir models/eval [--name SD-2-Inp-RCA-FineTuned] [--out DIR] [--metrics fid,lpips,...]

Inputs
  --preds DIR      `<stem>.png` per test image (the sampler's output). Each goes through the dataset's resize and
                   centre crop (identity for 512x512) and ToTensor/Normalize, like the ground truth.
  --dataset ROOT   the dataset (SPEC §1): images/<split>/<stem>.jpg, masks/<stem>/mask_<k>.png,
                   entities/<stem>/annotations.json (ground-truth captions).
  --manifest FILE  which masks were kept per image, in order (the selection the sampler used). JSON object:
                     { "<stem>": ["mask_3", "mask_0", ...], ... }
                   or, per stem, an object with the list under "masks" and optional extras:
                     { "<stem>": {"masks": ["mask_3", "mask_0"], "captions": ["...", "..."], "texts": [...]}, ... }
                   "captions", when present, must equal the annotations' captions of those masks (a check that
                   manifest and dataset belong together); "texts" (the prompts used, e.g. generated ones) and any
                   other key are ignored: CLIPSim-T2I always uses the ground-truth captions, as the original did
                   for the -Gen variant. The manifest's stems are the images evaluated (they must be in --split).
  --selection-seed N  instead of a manifest: replay idmp_jax's own test-time selection (area sort, the per-stem
                   shuffle from (N, stem), the 0.65 area threshold), i.e. what `InpaintingSource(seed=N)` keeps.
Model files (each metric stops with a message naming the file when it is missing; nothing is downloaded):
  fid       --inception   torch-fidelity's weights-inception-2015-12-05-6726825d.pth
  lpips     --squeezenet  torchvision's squeezenet1_1-b8a52dc0.pth, and --lpips-lin (default: the squeeze.pth
                          LPIPS v0.1 weights inside the installed torchmetrics wheel)
  clip_iqa  --clip-iqa    OpenAI's RN50.pt (tokenised with the --clip folder's CLIP tokenizer)
  clipsim   --clip        a transformers folder of openai/clip-vit-base-patch32
  psnr      needs nothing
`--models-dir D` fills any of these not given with D/<that file name> (D/clip-vit-base-patch32 for --clip).

Outputs in --out (default <preds>/eval): metrics.json (raw values: "all" = every image, "multi" = images with more
than one kept mask, the paper's figure in parentheses; "by_num_masks" = the breakdown), metrics.md (the paper's
row and the breakdown), cache/<stem>.npz (per-image results). A rerun reuses every cached image whose prediction
file (size, mtime) and kept masks are unchanged and computes only what is missing, so an interrupted run resumes;
--overwrite starts afresh. Combine runs with `python -m eval table */metrics.json`.

Definitions (the original's `compute`; SPEC §7): images in [0, 1] = dataset transform * 0.5 + 0.5.
  FID        torchmetrics FrechetInceptionDistance(feature=2048, normalize=True): real = ground truth, fake =
             predictions; features of x.byte() after x * 255 (eval/fid.py).
  PSNR       torchmetrics PeakSignalNoiseRatio(data_range=(0, 1)): clamp to [0, 1], ONE mean squared error pooled
             over every pixel of the set (of the group, in the breakdown), 10 log10(1 / MSE). Written out here
             (squared errors summed per image in float64, cached) because the metric object keeps only set sums.
  LPIPS      SqueezeNet LPIPS on [-1, 1] images, mean over images (eval/lpips.py).
  CLIP-IQA   torchmetrics CLIPImageQualityAssessment() defaults on the predictions, mean (eval/clip_iqa.py).
  CLIPSim    per kept mask, ground truth and prediction dimmed/blurred outside the mask (eval/clipsim.py);
             I2I = cos(image(gt view), image(pred view)); T2I = cos(text("A padded image of {caption}"),
             image(pred view)); means over all masks of all images (T2I also per number of masks).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from eval import common, table
from idmp_jax.data import files
from idmp_jax.data.inpainting import (InpaintingConfig, example_rng, resize_crop_mask, select_masks,
                                      threshold_count)

METRICS = ("fid", "lpips", "psnr", "clip_iqa", "clipsim")
# the arrays each metric leaves in a stem's cache entry
CACHE_KEYS = {"fid": ("fid_real", "fid_fake"), "lpips": ("lpips",), "psnr": ("psnr_sse", "psnr_n"),
              "clip_iqa": ("clip_iqa",), "clipsim": ("clipsim_t2i", "clipsim_i2i")}
# the files (keys of `resolve_models`) each metric's cached values depend on
MODEL_FILES = {"fid": ("inception",), "lpips": ("squeezenet", "lpips_lin"), "psnr": (),
               "clip_iqa": ("clip_iqa", "clip"), "clipsim": ("clip",)}
DEFAULT_FILES = {"inception": "weights-inception-2015-12-05-6726825d.pth", "squeezenet": "squeezenet1_1-b8a52dc0.pth",
                 "clip_iqa": "RN50.pt", "clip": "clip-vit-base-patch32"}


# ----------------------------------------------------------------------------------------------- selection
def load_manifest(path) -> dict[str, dict]:
  """{stem: {"masks": [...], "captions": [...] or None}} from either manifest form (see module docstring)."""
  data = common.read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: a manifest is a JSON object stem -> mask names")
  out = {}
  for stem, entry in data.items():
    if isinstance(entry, dict):
      masks, captions = entry.get("masks"), entry.get("captions")
    else:
      masks, captions = entry, None
    if not isinstance(masks, list) or not masks or not all(isinstance(m, str) for m in masks):
      raise ValueError(f"{path}: entry {stem!r} needs a non-empty list of mask names")
    if captions is not None and (not isinstance(captions, list) or len(captions) != len(masks)):
      raise ValueError(f"{path}: entry {stem!r}: 'captions' must list one caption per mask")
    out[stem] = {"masks": masks, "captions": captions}
  return out


@dataclasses.dataclass
class Example:
  stem: str
  masks: list          # kept mask names, in order
  captions: list       # ground-truth captions of the kept masks
  gt_pm1: torch.Tensor   # (3, H, W) in [-1, 1]
  gt01: torch.Tensor     # (3, H, W) in [0, 1]
  pred_pm1: torch.Tensor
  pred01: torch.Tensor
  mask_px: torch.Tensor  # (K, H, W) bool, each kept mask after resize/crop


def load_example(layout, split, stem, entry, seed, resolution, pred_path) -> Example:
  image, anns, masks = files.read_example(layout, split, stem, ("caption",))
  if entry is not None:
    kept = entry["masks"]
    unknown = [m for m in kept if m not in anns]
    if unknown:
      raise files.BadExampleError(layout.annotations(stem), f"manifest names masks {unknown} not in {list(anns)}")
  else:  # the selection of InpaintingSource(seed=seed) at epoch 0
    config = InpaintingConfig(resolution=resolution)
    kept = select_masks(list(anns), masks, config, example_rng(seed, stem))
    resized = [resize_crop_mask(masks[n], resolution).astype(np.float32) / np.float32(255) for n in kept]
    kept = kept[:threshold_count(resized, config.masked_area_threshold)]
  captions = [anns[n]["caption"] for n in kept]
  if entry is not None and entry["captions"] is not None and entry["captions"] != captions:
    raise files.BadExampleError(layout.annotations(stem), "manifest captions differ from the annotations' "
                                f"({entry['captions']} vs {captions}): manifest and dataset do not match")
  mask_px = torch.from_numpy(np.stack([resize_crop_mask(masks[n], resolution) > 0 for n in kept]))
  gt_pm1, gt01 = common.dataset_unit_image(image, resolution)
  try:
    pred = common.read_rgb(pred_path)
  except Exception as e:  # PIL raises many kinds for broken files
    raise files.BadExampleError(pred_path, f"prediction unreadable ({type(e).__name__}: {e})") from None
  pred_pm1, pred01 = common.dataset_unit_image(pred, resolution)
  return Example(stem, list(kept), captions, gt_pm1, gt01, pred_pm1, pred01, mask_px)


# ----------------------------------------------------------------------------------------------- models
def resolve_models(args, metrics) -> dict:
  """Paths of the files each requested metric needs; ModelFileError before any work when one is missing."""
  d = args.models_dir
  pick = lambda given, key: given or (os.path.join(d, DEFAULT_FILES[key]) if d else None)  # noqa: E731
  paths = {}
  if "fid" in metrics:
    paths["inception"] = common.require_path("fid", pick(args.inception, "inception"),
                                             "torch-fidelity's FID Inception weights " + DEFAULT_FILES["inception"],
                                             "--inception")
  if "lpips" in metrics:
    from eval.lpips import default_lin_path
    paths["squeezenet"] = common.require_path("lpips", pick(args.squeezenet, "squeezenet"),
                                              "torchvision's SqueezeNet 1.1 weights " + DEFAULT_FILES["squeezenet"],
                                              "--squeezenet")
    paths["lpips_lin"] = common.require_path("lpips", args.lpips_lin or default_lin_path(),
                                             "the LPIPS v0.1 squeeze.pth linear weights (shipped in torchmetrics)",
                                             "--lpips-lin")
  if "clip_iqa" in metrics or "clipsim" in metrics:
    metric = "clipsim" if "clipsim" in metrics else "clip_iqa (its tokenizer)"
    paths["clip"] = common.require_path(metric, pick(args.clip, "clip"),
                                        "a transformers folder of openai/clip-vit-base-patch32", "--clip", folder=True)
  if "clip_iqa" in metrics:
    paths["clip_iqa"] = common.require_path("clip_iqa", pick(args.clip_iqa, "clip_iqa"),
                                            "OpenAI's CLIP ResNet-50 weights RN50.pt", "--clip-iqa")
  return paths


class Models:
  """Loaded lazily: a fully cached rerun loads nothing."""

  def __init__(self, paths, device):
    self.paths, self.device, self._cache = paths, device, {}

  def get(self, name):
    if name not in self._cache:
      p, dev = self.paths, self.device
      if name == "fid":
        from eval.fid import load_fid_inception
        self._cache[name] = load_fid_inception(p["inception"], dev)
      elif name == "lpips":
        from eval.lpips import load_lpips
        self._cache[name] = load_lpips(p["squeezenet"], p["lpips_lin"], dev)
      elif name == "clipsim":
        from eval.clipsim import ClipScorer
        self._cache[name] = ClipScorer(p["clip"], dev)
      elif name == "clip_iqa":
        from transformers import CLIPTokenizer
        from eval.clip_iqa import load_clip_iqa
        self._cache[name] = load_clip_iqa(p["clip_iqa"], CLIPTokenizer.from_pretrained(p["clip"]), dev)
    return self._cache[name]


# ----------------------------------------------------------------------------------------------- per image
@torch.no_grad()
def compute_batch(examples: list[Example], metrics, models: Models) -> list[dict]:
  """Per-image results of the requested metrics for a batch (the arrays stored in the cache)."""
  dev = models.device
  out = [{} for _ in examples]
  gt01 = torch.stack([e.gt01 for e in examples]).to(dev)
  pred01 = torch.stack([e.pred01 for e in examples]).to(dev)
  if "psnr" in metrics:
    for o, g, p in zip(out, gt01, pred01):
      diff = p.clamp(0, 1) - g.clamp(0, 1)  # torchmetrics clamps both to the data range
      o["psnr_sse"] = np.float64(torch.sum(diff.double() * diff.double()).item())
      o["psnr_n"] = np.int64(diff.numel())
  if "fid" in metrics:
    from eval.fid import fid_features
    net = models.get("fid")
    for o, r, f in zip(out, fid_features(net, gt01).cpu().numpy(), fid_features(net, pred01).cpu().numpy()):
      o["fid_real"], o["fid_fake"] = r, f
  if "lpips" in metrics:
    scores = models.get("lpips")(torch.stack([e.pred_pm1 for e in examples]).to(dev),
                                 torch.stack([e.gt_pm1 for e in examples]).to(dev))
    for o, s in zip(out, scores.cpu().numpy()):
      o["lpips"] = np.float32(s)
  if "clip_iqa" in metrics:
    for o, s in zip(out, models.get("clip_iqa")(pred01).cpu().numpy()):
      o["clip_iqa"] = np.float32(s)
  if "clipsim" in metrics:
    from eval.clipsim import masked_views
    clip = models.get("clipsim")
    gt_views, pred_views, texts = [], [], []
    for e in examples:
      masks = e.mask_px.to(dev)
      gt_views += masked_views(e.gt01.to(dev), masks)
      pred_views += masked_views(e.pred01.to(dev), masks)
      texts += [f"A padded image of {c}" for c in e.captions]
    pred_emb = clip.image_embeds(pred_views)
    t2i = clip.cosine(clip.text_embeds(texts), pred_emb)
    i2i = clip.cosine(clip.image_embeds(gt_views), pred_emb)
    start = 0
    for o, e in zip(out, examples):
      k = len(e.masks)
      o["clipsim_t2i"] = np.asarray(t2i[start:start + k], np.float32)
      o["clipsim_i2i"] = np.asarray(i2i[start:start + k], np.float32)
      start += k
  return out


def _pred_identity(path) -> np.ndarray:
  st = os.stat(path)
  return np.asarray([st.st_size, st.st_mtime_ns], np.int64)


def read_cache(path) -> dict | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except FileNotFoundError:
    return None
  except Exception:  # a damaged entry (e.g. disk full) is recomputed, not fatal
    return None


def save_cache(path, entry: dict) -> None:
  common.atomic_write(path, lambda f: np.savez(f, **entry))


# ----------------------------------------------------------------------------------------------- aggregation
def aggregate(entries: list[dict], metrics) -> dict:
  """Set-level values of one group of images (raw, unscaled)."""
  res = {"num_images": len(entries), "num_masks": int(sum(int(e["num_masks"]) for e in entries))}
  if not entries:
    return res
  if "psnr" in metrics:
    sse = math.fsum(float(e["psnr_sse"]) for e in entries)
    n = sum(int(e["psnr_n"]) for e in entries)
    res["psnr"] = float("inf") if sse == 0 else 10 * math.log10(1.0 / (sse / n))
  if "fid" in metrics:
    if len(entries) >= 2:
      from eval.fid import frechet_distance
      res["fid"] = frechet_distance(torch.from_numpy(np.stack([e["fid_real"] for e in entries])),
                                    torch.from_numpy(np.stack([e["fid_fake"] for e in entries])))
    else:
      res["fid"] = None  # needs two images per set, as torchmetrics
  for key in ("lpips", "clip_iqa"):
    if key in metrics:
      res[key] = float(np.mean([float(e[key]) for e in entries], dtype=np.float64))
  if "clipsim" in metrics:
    for key in ("clipsim_t2i", "clipsim_i2i"):
      res[key] = float(np.mean(np.concatenate([e[key] for e in entries]), dtype=np.float64))
  return res


def summarize(entries: dict[str, dict], metrics, max_concepts=5) -> dict:
  values = list(entries.values())
  by_k = {}
  for k in range(1, max_concepts + 1):
    group = [e for e in values if int(e["num_masks"]) == k]
    by_k[str(k)] = aggregate(group, [m for m in metrics if m != "fid"])
  return {"all": aggregate(values, metrics),
          "multi": aggregate([e for e in values if int(e["num_masks"]) > 1], metrics),
          "by_num_masks": by_k}


# ----------------------------------------------------------------------------------------------- command
def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m eval.inpainting", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preds", required=True, help="folder of <stem>.png predictions")
  p.add_argument("--dataset", required=True, help="dataset root (mm_inp_dataset)")
  p.add_argument("--split", default="test")
  sel = p.add_mutually_exclusive_group(required=True)
  sel.add_argument("--manifest", help="JSON: stem -> kept mask names in order (see above)")
  sel.add_argument("--selection-seed", type=int, help="replay InpaintingSource(seed=N)'s selection instead")
  p.add_argument("--out", help="output folder (default <preds>/eval)")
  p.add_argument("--name", help="row label (default: the preds folder's name, its parent's if it is 'images')")
  p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {', '.join(METRICS)}")
  p.add_argument("--models-dir", help="folder holding the model files under their usual names")
  p.add_argument("--inception", help=DEFAULT_FILES["inception"])
  p.add_argument("--squeezenet", help=DEFAULT_FILES["squeezenet"])
  p.add_argument("--lpips-lin", help="LPIPS squeeze.pth (default: torchmetrics' copy)")
  p.add_argument("--clip-iqa", help="OpenAI RN50.pt")
  p.add_argument("--clip", help="openai/clip-vit-base-patch32 folder")
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--num-workers", type=int, default=4, help="threads reading images")
  p.add_argument("--device", help="torch device (default cuda if available)")
  p.add_argument("--max-images", type=int, help="evaluate only the first N stems (sorted)")
  p.add_argument("--skip-missing", action="store_true", help="skip stems without a prediction (counted in the JSON) "
                                                             "instead of stopping")
  p.add_argument("--overwrite", action="store_true", help="discard the cache of --out")
  args = p.parse_args(argv)
  args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in args.metrics if m not in METRICS]
  if bad or not args.metrics:
    p.error(f"--metrics: unknown {bad}; choose from {', '.join(METRICS)}")
  return args


def run(args) -> dict:
  metrics = [m for m in METRICS if m in args.metrics]
  paths = resolve_models(args, metrics)
  layout = files.Layout(os.fspath(args.dataset))
  split_stems, _ = files.list_split(layout.root, args.split)
  if args.manifest:
    manifest = load_manifest(args.manifest)
    outside = sorted(set(manifest) - set(split_stems))
    if outside:
      raise ValueError(f"{args.manifest}: {len(outside)} stems are not annotated images of split "
                       f"{args.split!r} in {layout.root}, e.g. {outside[:5]}")
    stems = sorted(manifest)
  else:
    manifest, stems = None, split_stems
  if args.max_images is not None:
    stems = stems[:args.max_images]
  pred_path = lambda s: os.path.join(args.preds, f"{s}.png")  # noqa: E731
  missing = [s for s in stems if not os.path.isfile(pred_path(s))]
  if missing and not args.skip_missing:
    raise FileNotFoundError(f"{len(missing)} of {len(stems)} predictions missing in {args.preds}, e.g. "
                            f"{[pred_path(s) for s in missing[:5]]} (--skip-missing evaluates the rest)")
  stems = [s for s in stems if s not in set(missing)] if missing else stems
  if not stems:
    raise ValueError("no image to evaluate")

  out_dir = args.out or os.path.join(args.preds, "eval")
  cache_dir = os.path.join(out_dir, "cache")
  fingerprint_path = os.path.join(cache_dir, "fingerprint.json")
  if args.overwrite and os.path.isdir(cache_dir):
    for f in os.listdir(cache_dir):
      os.remove(os.path.join(cache_dir, f))
  fingerprint = {"dataset": os.path.realpath(layout.root), "split": args.split, "resolution": args.resolution,
                 "preds": os.path.realpath(args.preds), "selection_seed": args.selection_seed,
                 "models": {m: [common.file_identity(paths[k]) for k in MODEL_FILES[m]] for m in metrics}}
  if os.path.exists(fingerprint_path):
    old = common.read_json(fingerprint_path)
    stale = [k for k in ("dataset", "split", "resolution", "preds", "selection_seed") if old.get(k) != fingerprint[k]]
    stale += [m for m, ident in fingerprint["models"].items() if m in old.get("models", {}) and
              old["models"][m] != ident]
    if stale:
      raise ValueError(f"{cache_dir} was made with other {stale}: use another --out or --overwrite")
    fingerprint["models"] = {**old.get("models", {}), **fingerprint["models"]}
  common.write_json(fingerprint_path, fingerprint)

  # which stems need work, and which of their metrics
  entries, todo = {}, []
  for s in stems:
    entry = read_cache(os.path.join(cache_dir, common.safe_name(s) + ".npz"))
    valid = entry is not None and np.array_equal(entry.get("pred_id"), _pred_identity(pred_path(s)))
    if valid and manifest is not None:
      valid = list(entry["masks"]) == manifest[s]["masks"]
    if not valid:
      entry = None
    need = [m for m in metrics if entry is None or any(k not in entry for k in CACHE_KEYS[m])]
    if need:
      todo.append((s, entry, need))
    else:
      entries[s] = entry
  device = common.pick_device(args.device)
  models = Models(paths, device)
  loader = lambda s: load_example(layout, args.split, s, manifest[s] if manifest else None,  # noqa: E731
                                  args.selection_seed, args.resolution, pred_path(s))
  batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, args.num_workers)) as pool:
    pending = _read_ahead(pool, loader, batches)
    for batch, examples in tqdm(zip(batches, pending), total=len(batches), desc=f"inpainting {len(todo)} images",
                                disable=not batches):
      need = [m for m in metrics if any(m in n for _, _, n in batch)]
      results = compute_batch(examples, need, models)
      for (s, old, _), ex, res in zip(batch, examples, results):
        entry = dict(old or {})
        entry.update(res)
        entry.update(num_masks=np.int64(len(ex.masks)), masks=np.asarray(ex.masks),
                     pred_id=_pred_identity(pred_path(s)))
        save_cache(os.path.join(cache_dir, common.safe_name(s) + ".npz"), entry)
        entries[s] = entry

  summary = summarize({s: entries[s] for s in stems}, metrics)
  result = {
      "kind": "inpainting",
      "name": args.name or _default_name(args.preds),
      "num_images": len(stems),
      "num_images_multi": summary["multi"]["num_images"],
      "computed_now": len(todo),
      "missing_predictions": missing,
      "metrics": {"all": summary["all"], "multi": summary["multi"]},
      "by_num_masks": summary["by_num_masks"],
      "scale_in_tables": {k: table.SCALES[k] for k in summary["all"] if k in table.SCALES},
      "settings": {"preds": os.path.abspath(args.preds), "dataset": os.path.abspath(layout.root),
                   "split": args.split, "manifest": os.path.abspath(args.manifest) if args.manifest else None,
                   "selection_seed": args.selection_seed, "resolution": args.resolution, "metrics": metrics,
                   "models": {k: os.path.abspath(v) for k, v in paths.items()}, "device": device},
  }
  common.write_json(os.path.join(out_dir, "metrics.json"), result)
  md = (f"## {result['name']}: {len(stems)} images ({result['num_images_multi']} with more than one mask)\n\n"
        + table.inpainting_table([result]) + "\nBy number of masks:\n\n" + table.breakdown_table(result))
  common.write_text(os.path.join(out_dir, "metrics.md"), md)
  result["markdown"] = md
  return result


def _default_name(preds) -> str:
  """The preds folder's name, or its parent's for the sampler's layout (<workdir>/images/<stem>.png)."""
  path = os.path.normpath(os.path.abspath(preds))
  return os.path.basename(os.path.dirname(path) if os.path.basename(path) == "images" else path)


def _read_ahead(pool, loader, batches, depth: int = 2):
  """Examples of each batch, read by the pool's threads at most `depth` batches ahead (bounded memory)."""
  futures = []
  for i in range(len(batches)):
    while len(futures) < depth and i + len(futures) < len(batches):
      futures.append([pool.submit(loader, s) for s, _, _ in batches[i + len(futures)]])
    yield [f.result() for f in futures.pop(0)]


def main(argv=None) -> int:
  return common.cli_main("eval inpainting", parse_args, run, argv)


if __name__ == "__main__":
  sys.exit(main())
