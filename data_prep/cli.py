"""`python -m data_prep <step> ...`: the original README's dataset steps, plus validate and make-demo-dataset.

Steps (original command in brackets):
  download                      [downloader download-and-save-images-wikiart-v2]
  make-masks                    [ops make-masks-dataset]
  make-entities                 [ops make-entities-dataset]
  extract-noun-chunk-roots      [ops extract-noun-chunk-roots]
  caption-masks                 [ops caption-masks]
  llava-annotations-to-folder   [ops llava-annotations-to-folder]
  clean-captions                [ops llava-annotations-to-entity-annotations] (that name is accepted too)
  split                         [ops train-val-test-split]
  validate                      list every problem of a dataset, with paths
  make-demo-dataset             a small dataset from scikit-image's photographs
  build-tfds                    TFDS/ArrayRecord build of a dataset (needs the `tfds` extra)
Every step exits 0 on success, 1 when it finished with problems it reported, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="step", required=True, metavar="STEP")

  s = sub.add_parser("download", help="fetch the WikiArt thumbnails listed in wikiart_images.csv")
  s.add_argument("--csv", default="data/wikiart_images.csv", help="file_name,url,modifier,split")
  s.add_argument("-o", "--output-dir", default="data/mm_inp_dataset/images")
  s.add_argument("--num-threads", type=int, default=16)
  s.add_argument("--timeout", type=float, default=30.0, help="seconds per connection/read")
  s.add_argument("--retries", type=int, default=5)
  s.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
  s.add_argument("--missing-list", help="write the names still missing to this file")

  for name, helptext in (("make-masks", "masks/<stem>/mask_<k>.png from Kosmos-2 boxes"),
                         ("make-entities", "entities/<stem>/ crops and annotations.json")):
    s = sub.add_parser(name, help=helptext)
    s.add_argument("--annotations-path", required=True, help="Kosmos-2 global annotations.json")
    s.add_argument("--image-dir", required=True, help="images/ (flat or already split)")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)

  s = sub.add_parser("extract-noun-chunk-roots", help="noun_chunk_root of every concept (spaCy)")
  s.add_argument("--entities-dir", required=True)
  s.add_argument("--spacy-model", default="en_core_web_sm", help="installed pipeline name or folder")

  s = sub.add_parser("caption-masks", help="LLaVA captions of the entity crops (resumable, shardable)")
  s.add_argument("--entities-dir", required=True)
  s.add_argument("--model-id", default="llava-hf/llava-v1.6-vicuna-13b-hf",
                 help="llava-hf LLaVA-NeXT model: a local folder (jax), or a folder or hub id (transformers)")
  s.add_argument("--backend", choices=("jax", "transformers"), default="jax",
                 help="jax: idmp_jax's LLaVA-NeXT (one device per process); transformers: the original's")
  s.add_argument("--dtype", help="jax backend compute dtype (default: bfloat16 on an accelerator, float32 on CPU)")
  s.add_argument("--batch-size", type=int, default=8)
  s.add_argument("--max-new-tokens", type=int, default=40)
  s.add_argument("--num-processes", type=int, default=1)
  s.add_argument("--process-id", type=int, default=0)
  s.add_argument("--backup-dir", default=".", help="where backup_{id}.json / backup_{id}_final.json live")
  s.add_argument("--save-every", type=int, default=100, help="batches between progress saves")

  s = sub.add_parser("llava-annotations-to-folder", help="captions -> entities/<stem>/llava.json")
  s.add_argument("--annotations-path", required=True, nargs="+", help="llava.json or backup_*_final.json files")
  s.add_argument("--out-dir", required=True, help="the entities folder")

  for name in ("clean-captions", "llava-annotations-to-entity-annotations"):
    s = sub.add_parser(name, help="cleaned captions into annotations.json")
    s.add_argument("--entities-dir", required=True)

  s = sub.add_parser("split", help="move images into train/val/test/unannotated")
  s.add_argument("--image-dir", required=True)
  s.add_argument("--masks-dir", required=True)
  s.add_argument("--split-csv", "--split-df-path", dest="split_csv", help="the original's wikiart_images.csv")
  s.add_argument("--random-seed", type=int, help="without a CSV: the original's random split algorithm")
  s.add_argument("--num-val", type=int, default=5000)
  s.add_argument("--num-test", type=int, default=5000)

  s = sub.add_parser("validate", help="list every problem of a dataset (exit 1 if any)")
  s.add_argument("--data-dir", required=True, help="the dataset root (mm_inp_dataset)")
  s.add_argument("--splits", nargs="+", default=["train", "val", "test"])
  s.add_argument("--require", nargs="*", default=["concept", "noun_chunk_root", "caption"],
                 help="keys every mask's annotation must have")
  s.add_argument("--no-entities", action="store_true", help="do not check the entity crops")
  s.add_argument("--num-workers", type=int, default=1)
  s.add_argument("--json", help="also write the problems as JSON here")

  s = sub.add_parser("make-demo-dataset", help="a small dataset from scikit-image's sample photographs")
  s.add_argument("--out-dir", required=True, help="gets annotations.json, llava.json, wikiart_images.csv, "
                                                  "mm_inp_dataset/")
  s.add_argument("--copies", type=int, default=1, help="variants per train photograph")
  s.add_argument("--spacy-model", help="compute noun-chunk roots with this spaCy pipeline instead of the table")

  s = sub.add_parser("build-tfds", help="TFDS ArrayRecord shards of a dataset (resumable, shardable)")
  s.add_argument("--data-dir", required=True, help="the dataset root (mm_inp_dataset)")
  s.add_argument("--out", required=True, help="TFDS data dir: gets idmp_inpainting/<version>/")
  s.add_argument("--splits", nargs="+", default=["train", "val", "test"])
  s.add_argument("--examples-per-shard", type=int, default=1000)
  s.add_argument("--num-processes", type=int, default=1)
  s.add_argument("--process-id", type=int, default=0)
  s.add_argument("--num-threads", type=int, help="decoding threads (default: cores, at most 8)")
  return p


def main(argv=None, captioner=None) -> int:
  """Runs one step; `captioner` replaces caption-masks' LLaVA (tests)."""
  args = _parser().parse_args(argv)
  step = args.step
  if step == "download":
    from data_prep import download
    options = download.Options(num_threads=args.num_threads, timeout=args.timeout, retries=args.retries,
                               backoff=args.backoff)
    stats = download.download(args.csv, args.output_dir, options, missing_list=args.missing_list)
    return 1 if stats["missing"] else 0
  if step in ("make-masks", "make-entities"):
    from data_prep import annotate
    fn = annotate.make_masks if step == "make-masks" else annotate.make_entities
    return fn(args.annotations_path, args.image_dir, args.out_dir, args.num_workers)
  if step == "extract-noun-chunk-roots":
    from data_prep import text
    return text.extract_noun_chunk_roots(args.entities_dir, args.spacy_model)
  if step == "caption-masks":
    from data_prep import caption
    if captioner is None and args.backend == "jax":
      captioner = caption.JaxLlavaCaptioner(args.model_id, args.max_new_tokens, dtype=args.dtype)
    elif captioner is None:
      captioner = caption.TransformersLlavaCaptioner(args.model_id, args.max_new_tokens)
    return caption.caption_masks(args.entities_dir, captioner, args.batch_size, args.num_processes,
                                 args.process_id, args.backup_dir, args.save_every)
  if step == "llava-annotations-to-folder":
    from data_prep import text
    return text.llava_annotations_to_folder(args.annotations_path, args.out_dir)
  if step in ("clean-captions", "llava-annotations-to-entity-annotations"):
    from data_prep import text
    return text.clean_captions(args.entities_dir)
  if step == "split":
    from data_prep import split
    if args.split_csv is None and args.random_seed is None:
      print("error: split needs --split-csv (the original's wikiart_images.csv) or --random-seed", file=sys.stderr)
      return 2
    return split.split_dataset(args.image_dir, args.masks_dir, args.split_csv, args.random_seed, args.num_val,
                               args.num_test)
  if step == "validate":
    from idmp_jax.data.files import validate_dataset
    problems, counts = validate_dataset(args.data_dir, args.splits, args.require, not args.no_entities,
                                        args.num_workers, progress=True)
    for problem in problems:
      print(problem)
    print(f"validate: {counts}; {len(problems)} problem(s)")
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"counts": counts, "problems": [{"path": p.path, "reason": p.reason} for p in problems]}, f,
                  indent=2)
    return 1 if problems else 0
  if step == "make-demo-dataset":
    from data_prep import demo
    root = demo.make_demo_dataset(args.out_dir, args.copies, args.spacy_model)
    print(f"make-demo-dataset: {root}")
    return 0
  if step == "build-tfds":
    try:
      from data_prep import tfds_builder
    except ImportError as e:
      print(f"error: build-tfds needs tensorflow-datasets ({e}): pip install 'idmp_jax[tfds]'", file=sys.stderr)
      return 2
    summary = tfds_builder.build_tfds(args.data_dir, args.out, splits=args.splits,
                                      examples_per_shard=args.examples_per_shard,
                                      num_processes=args.num_processes, process_id=args.process_id,
                                      num_threads=args.num_threads)
    done = "finished: " + json.dumps(summary["counts"]) if summary["finished"] else "other processes' shards pending"
    print(f"build-tfds: {summary['build_dir']}: {summary['shards_written']} shard(s) written, "
          f"{summary['shards_already_done']} already done, {len(summary['left_out'])} record(s) left out; {done}")
    return 1 if summary["left_out"] else 0
  raise AssertionError(step)
