"""Markdown tables shaped like the paper's (reference README), from the JSON the eval commands write.

`python -m eval table A/metrics.json B/metrics.json ... [--out table.md]` puts several runs (one row each, all of
one kind) into one table, in the order given. JSON values are raw (as torchmetrics returns them); the tables show
them ×100 where the paper does (`SCALES`), two decimals.
"""
from __future__ import annotations

import argparse
import sys

# (key in the JSON, column header, factor to the paper's unit)
INPAINTING_COLUMNS = (("fid", "FID ↓", 1), ("lpips", "LPIPS ↓", 100), ("psnr", "PSNR ↑", 1),
                      ("clip_iqa", "CLIP-IQA ↑", 100), ("clipsim_i2i", "CLIPSim-I2I ↑", 100),
                      ("clipsim_t2i", "CLIPSim-T2I ↑", 100))
PROMPT_COLUMNS = (("accuracy", "Accuracy (%)", 100), ("bleu1", "BLEU@1", 100), ("bleu4", "BLEU@4", 100),
                  ("rouge_l", "ROUGE-L", 100), ("clipsim", "CLIPSim", 100))
BREAKDOWN_COLUMNS = (("psnr", "PSNR ↑", 1), ("clipsim_t2i", "CLIPSim-T2I ↑", 100), ("lpips", "LPIPS ↓", 100),
                     ("clip_iqa", "CLIP-IQA ↑", 100), ("clipsim_i2i", "CLIPSim-I2I ↑", 100))
SCALES = {key: f for cols in (INPAINTING_COLUMNS, PROMPT_COLUMNS) for key, _, f in cols}


def fmt(value, factor) -> str:
  return "–" if value is None else f"{value * factor:.2f}"


def _rows(header, lines):
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def inpainting_table(results) -> str:
  """One row per run: 'value (value over images with more than one mask)' per cell, like the paper."""
  lines = []
  for r in results:
    a, m = r["metrics"]["all"], r["metrics"]["multi"]
    lines.append([r["name"]] + [f"{fmt(a.get(k), f)} ({fmt(m.get(k), f)})" for k, _, f in INPAINTING_COLUMNS])
  return "\n".join(_rows([""] + [h for _, h, _ in INPAINTING_COLUMNS], lines)) + "\n"


def breakdown_table(result) -> str:
  """By number of kept masks (PSNR pooled per group, the rest averaged per group)."""
  lines = []
  for k, g in sorted(result["by_num_masks"].items(), key=lambda kv: int(kv[0])):
    lines.append([k, str(g["num_images"]), str(g["num_masks"])] + [fmt(g.get(c), f) for c, _, f in BREAKDOWN_COLUMNS])
  return "\n".join(_rows(["masks", "images", "mask count"] + [h for _, h, _ in BREAKDOWN_COLUMNS], lines)) + "\n"


def prompts_table(results) -> str:
  lines = [[r["name"]] + [fmt(r["metrics"].get(k), f) for k, _, f in PROMPT_COLUMNS] for r in results]
  return "\n".join(_rows([""] + [h for _, h, _ in PROMPT_COLUMNS], lines)) + "\n"


def markdown(results) -> str:
  kinds = {r.get("kind") for r in results}
  if len(kinds) != 1 or not kinds <= {"inpainting", "prompts"}:
    raise ValueError(f"expected results of one kind (inpainting or prompts), got {sorted(map(str, kinds))}")
  return inpainting_table(results) if kinds == {"inpainting"} else prompts_table(results)


def main(argv=None) -> int:
  from eval.common import read_json, write_text
  p = argparse.ArgumentParser(prog="python -m eval table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="+", help="metrics.json files written by eval inpainting / eval prompts")
  p.add_argument("--out", help="write the Markdown here too")
  args = p.parse_args(argv)
  try:
    text = markdown([read_json(path) for path in args.results])
  except (OSError, ValueError, KeyError) as e:
    print(f"eval table: {e}", file=sys.stderr)
    return 2
  if args.out:
    write_text(args.out, text)
  sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
