"""`python -m eval.prompts`: the prompt-generation table (SPEC §10) from generated prompts on disk.

  python -m eval.prompts --predictions OUT/multimask --dataset data/mm_inp_dataset \
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-MultiMask-All --out OUT/multimask/eval [--last-only]

Inputs
  --predictions PATH  a JSON file {"<stem>": [...], ...} or a folder of <stem>.json files holding the list. Per stem,
                 one item per region in the generator's order (the last item is the region asked for last, the
                 red/gray one that MultiMask-LastPred scores). An item is
                   {"mask": "mask_2", "prediction": "a red apple on a plate"}
                 (a null or missing prediction is ""; other keys are ignored)
                 or a plain string (SPEC §6's layout: a list of prompts in mask order); then --manifest names the
                 masks (the schema of eval.inpainting's manifest: stem -> mask names, or {"masks": [...]}), and
                 the two lists must have the same length.
  --dataset ROOT the dataset (SPEC §1): entities/<stem>/annotations.json (caption, noun_chunk_root) and the entity
                 crops entities/<stem>/mask_<k>.png.
  --last-only    score only each stem's last item (LLaVA-MultiMask-LastPred); default: every item.
  --clip DIR     a transformers folder of openai/clip-vit-base-patch32 (CLIPSim; nothing is downloaded).
Predictions are lower-cased here, as the original's test loop lower-cased the whole answer before extracting the
regions (so this is a no-op on our generator's output); an empty prediction counts as "" everywhere.

Metrics (raw in metrics.json, ×100 in metrics.md), over every scored (stem, mask) pair:
  accuracy   1 if the mask's noun_chunk_root occurs in the prediction (plain, case-sensitive substring: "cat"
             counts in "cats" and in "category"), else 0; mean.
  bleu1/4    torchmetrics BLEUScore(n_gram=1|4): corpus-level (clipped n-gram counts and lengths summed over the
             whole set, one brevity penalty), no smoothing; the reference = the mask's caption. Tokens are
             BLEUScore's: `str.split()` on whitespace, punctuation stays attached ("clouds!" is one token). SPEC §10
             says "13a tokeniser"; that is torchmetrics' SacreBLEUScore, not the BLEUScore the original used.
  rouge_l    torchmetrics ROUGEScore defaults, "rougeL_fmeasure" averaged over pairs (lower-case, non-alphanumerics
             to spaces, no stemming). Only the rougeL key is computed: the others do not change it.
  clipsim    cos(text("An image of {prediction}"), image(entity crop resized straight to 224x224, bicubic)).
Outputs in --out: metrics.json, metrics.md, cache/clipsim.jsonl (per-pair CLIP scores; a rerun reuses them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from eval import common, table
from idmp_jax.data import files

METRICS = ("accuracy", "bleu", "rouge", "clipsim")


# ----------------------------------------------------------------------------------------------- the metrics
def accuracy_hits(predictions, roots) -> list[int]:
  """The original's rule: `noun_chunk_root in prediction` (substring, case-sensitive; callers lower-case the
  prediction)."""
  return [int(root in pred) for pred, root in zip(predictions, roots)]


def bleu(predictions, references, n_gram: int) -> float:
  from torchmetrics.text import BLEUScore
  return float(BLEUScore(n_gram=n_gram)(list(predictions), [[r] for r in references]))


def rouge_l(predictions, references) -> float:
  from torchmetrics.text import ROUGEScore
  return float(ROUGEScore(rouge_keys="rougeL")(list(predictions), list(references))["rougeL_fmeasure"])


# ----------------------------------------------------------------------------------------------- inputs
def _read_predictions(path) -> dict:
  if os.path.isdir(path):
    return {f[:-5]: common.read_json(os.path.join(path, f)) for f in sorted(os.listdir(path)) if f.endswith(".json")}
  data = common.read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object stem -> list of predictions")
  return data


def load_pairs(predictions_path, manifest_path=None) -> dict[str, list[tuple[str, str]]]:
  """{stem: [(mask name, prediction), ...]} in the generator's order."""
  raw = _read_predictions(predictions_path)
  manifest = None
  if manifest_path:
    from eval.inpainting import load_manifest
    manifest = load_manifest(manifest_path)
  out = {}
  for stem, items in raw.items():
    where = f"{predictions_path}: {stem!r}"
    if not isinstance(items, list):
      raise ValueError(f"{where}: expected a list, got {type(items).__name__}")
    if all(isinstance(x, dict) for x in items):
      bad = [x for x in items if not isinstance(x.get("mask"), str) or not isinstance(x.get("prediction") or "", str)]
      if bad:
        raise ValueError(f"{where}: items need a string 'mask' and 'prediction', got {bad[0]}")
      out[stem] = [(x["mask"], x.get("prediction") or "") for x in items]
    elif all(isinstance(x, str) for x in items):
      if manifest is None:
        raise ValueError(f"{where}: plain prompt lists need --manifest to name their masks")
      if stem not in manifest or len(manifest[stem]["masks"]) != len(items):
        raise ValueError(f"{where}: {len(items)} prompts but the manifest lists "
                         f"{manifest.get(stem, {}).get('masks')}")
      out[stem] = list(zip(manifest[stem]["masks"], items))
    else:
      raise ValueError(f"{where}: items must all be strings or all {{'mask', 'prediction'}} objects")
  return out


def _key(stem, mask, prediction) -> str:
  return hashlib.sha1(f"{stem}\0{mask}\0{prediction}".encode("utf-8")).hexdigest()


def clipsim_scores(pairs, layout, scorer, cache_path, batch_size) -> list[float]:
  """CLIPSim per (stem, mask, prediction), reusing and extending the JSONL cache (written after every batch)."""
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path, "r", encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
          cache[rec["key"]] = rec["score"]
        except (json.JSONDecodeError, KeyError):  # a line cut by an interrupted write
          continue
  keys = [_key(*p) for p in pairs]
  todo = sorted({k: p for k, p in zip(keys, pairs) if k not in cache}.items())
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  with open(cache_path, "a", encoding="utf-8") as f:
    for i in tqdm(range(0, len(todo), batch_size), desc=f"clipsim {len(todo)} pairs", disable=not todo):
      chunk = todo[i:i + batch_size]
      images = []
      for _, (stem, mask, _) in chunk:
        path = layout.entity(stem, mask)
        try:
          images.append(common.read_rgb(path))
        except FileNotFoundError:
          raise files.BadExampleError(path, "entity crop is missing") from None
      scores = scorer.cosine(scorer.text_embeds([f"An image of {p}" for _, (_, _, p) in chunk]),
                             scorer.image_embeds(images))
      for (k, _), s in zip(chunk, scores):
        cache[k] = s
        f.write(json.dumps({"key": k, "score": s}) + "\n")
      f.flush()
  return [cache[k] for k in keys]


# ----------------------------------------------------------------------------------------------- command
def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m eval.prompts", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--predictions", required=True, help="JSON file or folder of <stem>.json (see above)")
  p.add_argument("--dataset", required=True, help="dataset root (mm_inp_dataset)")
  p.add_argument("--manifest", help="mask names for plain prompt lists")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--name", help="row label (default: the predictions' name)")
  p.add_argument("--last-only", action="store_true", help="score each stem's last item only (MultiMask-LastPred)")
  p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {', '.join(METRICS)}")
  p.add_argument("--clip", help="openai/clip-vit-base-patch32 folder")
  p.add_argument("--models-dir", help="folder holding clip-vit-base-patch32/")
  p.add_argument("--max-images", type=int, help="only the first N stems (sorted); the original scored <= 5000")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--device", help="torch device (default cuda if available)")
  p.add_argument("--overwrite", action="store_true", help="discard the CLIPSim cache of --out")
  args = p.parse_args(argv)
  args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in args.metrics if m not in METRICS]
  if bad or not args.metrics:
    p.error(f"--metrics: unknown {bad}; choose from {', '.join(METRICS)}")
  return args


def run(args) -> dict:
  metrics = [m for m in METRICS if m in args.metrics]
  clip_dir = None
  if "clipsim" in metrics:
    given = args.clip or (os.path.join(args.models_dir, "clip-vit-base-patch32") if args.models_dir else None)
    clip_dir = common.require_path("clipsim", given, "a transformers folder of openai/clip-vit-base-patch32",
                                   "--clip", folder=True)
  layout = files.Layout(os.fspath(args.dataset))
  by_stem = load_pairs(args.predictions, args.manifest)
  stems = sorted(by_stem)
  if args.max_images is not None:
    stems = stems[:args.max_images]
  pairs = []
  for stem in stems:
    items = by_stem[stem][-1:] if args.last_only else by_stem[stem]
    pairs += [(stem, mask, pred.lower()) for mask, pred in items]
  if not pairs:
    raise ValueError(f"{args.predictions}: no predictions to score")
  anns = {s: files.read_annotations(layout.annotations(s), ("caption", "noun_chunk_root")) for s in stems}
  for stem, mask, _ in pairs:
    if mask not in anns[stem]:
      raise files.BadExampleError(layout.annotations(stem), f"prediction for unknown mask {mask!r}")
  preds = [p for _, _, p in pairs]
  refs = [anns[s][m]["caption"] for s, m, _ in pairs]
  values = {}
  if "accuracy" in metrics:
    values["accuracy"] = float(np.mean(accuracy_hits(preds, [anns[s][m]["noun_chunk_root"] for s, m, _ in pairs])))
  if "bleu" in metrics:
    values["bleu1"], values["bleu4"] = bleu(preds, refs, 1), bleu(preds, refs, 4)
  if "rouge" in metrics:
    values["rouge_l"] = rouge_l(preds, refs)
  if "clipsim" in metrics:
    cache_dir = os.path.join(args.out, "cache")
    fingerprint_path = os.path.join(cache_dir, "fingerprint.json")
    if args.overwrite and os.path.isdir(cache_dir):
      for f in os.listdir(cache_dir):
        os.remove(os.path.join(cache_dir, f))
    ident = {"clip": common.file_identity(clip_dir), "dataset": os.path.realpath(layout.root)}
    if os.path.exists(fingerprint_path) and common.read_json(fingerprint_path) != ident:
      raise ValueError(f"{cache_dir} was made with another CLIP model or dataset: use another --out or --overwrite")
    common.write_json(fingerprint_path, ident)
    from eval.clipsim import ClipScorer
    scorer = ClipScorer(clip_dir, common.pick_device(args.device))
    scores = clipsim_scores(pairs, layout, scorer, os.path.join(cache_dir, "clipsim.jsonl"), args.batch_size)
    values["clipsim"] = float(np.mean(scores, dtype=np.float64))
  name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.predictions)))[0]
  result = {
      "kind": "prompts", "name": name, "subset": "last" if args.last_only else "all",
      "num_images": len(stems), "num_predictions": len(pairs), "empty_predictions": sum(not p for p in preds),
      "metrics": values,
      "scale_in_tables": {k: table.SCALES[k] for k in values},
      "settings": {"predictions": os.path.abspath(args.predictions), "dataset": os.path.abspath(layout.root),
                   "manifest": os.path.abspath(args.manifest) if args.manifest else None, "metrics": metrics,
                   "clip": os.path.abspath(clip_dir) if clip_dir else None},
  }
  common.write_json(os.path.join(args.out, "metrics.json"), result)
  md = f"## {name}: {len(pairs)} predictions on {len(stems)} images\n\n" + table.prompts_table([result])
  common.write_text(os.path.join(args.out, "metrics.md"), md)
  result["markdown"] = md
  return result


def main(argv=None) -> int:
  return common.cli_main("eval prompts", parse_args, run, argv)


if __name__ == "__main__":
  sys.exit(main())
