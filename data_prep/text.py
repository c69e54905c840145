"""Text steps: extract-noun-chunk-roots, llava-annotations-to-folder, clean-captions (SPEC §11).

extract-noun-chunk-roots: `noun_chunk_root` = text of the root of spaCy's first noun chunk of the concept, or the
whole concept when there is none. The model is an option (default en_core_web_sm, as the original); a model that
is not installed stops the step with an install hint. Any spaCy pipeline that sets POS and dependency labels
gives noun chunks.

llava-annotations-to-folder: the caption-masks output ({stem: {mask: raw caption}, "steps": n}, one or several
files, e.g. the `_final` file of every process) -> entities/<stem>/llava.json. Unlike the original, a stem whose
folder does not exist is reported and counted instead of crashing.

clean-captions (the original's `llava-annotations-to-entity-annotations`): `caption` = clean_caption(raw) into
entities/<stem>/annotations.json. A folder without llava.json is reported, not a crash.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

from data_prep import common

COLLAGE_WORDS = ("featuring", "depicting", "showing", "containing", "illustrating", "displaying", "exhibiting",
                 "portraying", "revealing", "highlighting", "showcasing", "demonstrating", "introducing",
                 "exposing", "unveiling", "including")


def clean_caption(caption: str) -> str:
  """The original's cleaning: lower-case, newline -> space, keep alphanumerics and " .,!", drop one final ".",
  remove "the image shows ", and for collages keep what follows the first describing word / "collage of".
  An empty caption gives "" (the original raised IndexError)."""
  caption = caption.lower().replace("\n", " ")
  caption = "".join(c for c in caption if c.isalnum() or c in " .,!")
  if caption.endswith("."):
    caption = caption[:-1]
  caption = caption.replace("the image shows ", "")
  if "collage" not in caption:
    return caption
  for word in COLLAGE_WORDS:
    if word in caption:
      caption = caption[caption.index(word) + len(word + " "):]
      break
  if "collage of" in caption:
    caption = caption[caption.index("collage of") + len("collage of "):]
  return caption


class SpacyModelMissing(Exception):
  pass


def load_spacy(model: str):
  try:
    import spacy
  except ImportError:
    raise SpacyModelMissing("spaCy is not installed: pip install spacy") from None
  try:
    return spacy.load(model)
  except OSError as e:
    raise SpacyModelMissing(
        f"spaCy model {model!r} is not installed ({e}).\nInstall it with:  python -m spacy download {model}\n"
        f"(or pip install the model's wheel), or pass --spacy-model with an installed pipeline name or a "
        "pipeline folder.") from None


def noun_chunk_root(nlp, concept: str) -> str:
  chunks = list(nlp(concept).noun_chunks)
  return chunks[0].root.text if chunks else concept


def extract_noun_chunk_roots(entities_dir, spacy_model: str = "en_core_web_sm", nlp=None) -> int:
  if nlp is None:
    try:
      nlp = load_spacy(spacy_model)
    except SpacyModelMissing as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  failed = 0
  for stem in tqdm(sorted(os.listdir(entities_dir)), desc="noun-chunk-roots", disable=None):
    path = os.path.join(entities_dir, stem, "annotations.json")
    if not os.path.isfile(path):
      continue
    try:
      annotations = common.read_json(path)
      for entry in annotations.values():
        entry["noun_chunk_root"] = noun_chunk_root(nlp, entry["concept"])
      common.atomic_write_json(path, annotations)
    except (ValueError, KeyError, AttributeError) as e:
      failed += 1
      print(f"error: {path}: {type(e).__name__}: {e}", file=sys.stderr)
  return 1 if failed else 0


def llava_annotations_to_folder(annotations_paths, out_dir) -> int:
  missing = 0
  for annotations_path in annotations_paths:
    data = common.read_json(annotations_path)
    for stem, captions in data.items():
      if stem == "steps":
        continue
      folder = os.path.join(out_dir, stem)
      if not os.path.isdir(folder):
        missing += 1
        print(f"error: {folder}: no entities folder for captions of {annotations_path}", file=sys.stderr)
        continue
      path = os.path.join(folder, "llava.json")
      if os.path.exists(path):  # several process files may hold different masks of one stem (resumed runs)
        captions = {**common.read_json(path), **captions}
      common.atomic_write_json(path, captions)
  return 1 if missing else 0


def clean_captions(entities_dir) -> int:
  problems = 0
  for stem in tqdm(sorted(os.listdir(entities_dir)), desc="clean-captions", disable=None):
    folder = os.path.join(entities_dir, stem)
    if not os.path.isdir(folder):
      continue
    llava_path = os.path.join(folder, "llava.json")
    if not os.path.exists(llava_path):
      problems += 1
      print(f"error: {llava_path}: missing", file=sys.stderr)
      continue
    path = os.path.join(folder, "annotations.json")
    try:
      llava, annotations = common.read_json(llava_path), common.read_json(path)
      for mask_name, caption in llava.items():
        annotations[mask_name]["caption"] = clean_caption(caption)
      common.atomic_write_json(path, annotations)
    except (OSError, ValueError, KeyError) as e:
      problems += 1
      print(f"error: {folder}: {type(e).__name__}: {e}", file=sys.stderr)
  return 1 if problems else 0
