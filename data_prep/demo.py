"""make-demo-dataset: a small dataset in exactly the on-disk format, from photographs shipped by scikit-image.

The photographs are the sample images inside the scikit-image wheel (`skimage/data/`: astronaut, rocket,
motorcycle_left, coins, chelsea, hubble_deep_field, coffee, camera, moon; declared dependency:
scikit-image==0.26.0, extra "demo"); no network. Written like the original's `data/`:

  <out>/annotations.json       Kosmos-2 schema (description, entities: phrase -> startend, normalised bboxes)
  <out>/llava.json             caption-masks schema ({stem: {mask_k: "The image shows ..."}, "steps": n})
  <out>/wikiart_images.csv     file_name, url, modifier, split
  <out>/mm_inp_dataset/        images/{train,val,test,unannotated}, masks/, entities/ (SPEC §1)

and built by running the real steps on them: make-masks, make-entities, extract-noun-chunk-roots,
llava-annotations-to-folder, clean-captions, split. The boxes, captions and noun-chunk roots are hand-written
(what Kosmos-2, LLaVA and en_core_web_sm would plausibly give); the roots go through the noun-chunk step with a
lookup table standing in for spaCy unless `spacy_model` names an installed pipeline.

Content, chosen to exercise the rules: a box over 65% of the image (dropped: "an astronaut", "a cat"), an image
whose only box is dropped (moon -> unannotated), multi-box entities (collages: launch towers, eyes, coins), a
collage caption with a describing word ("featuring") and one with "collage of", five masks with a 61% mask
(astronaut, coffee), grayscale sources (camera, coins, moon). `copies` > 1 adds mirrored/scaled variants of the
train images (stems `<stem>_v<j>`) for a bigger train split.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil

from PIL import Image, ImageOps

from data_prep import annotate, common, split as split_step, text

# (source file, split, [(phrase, bboxes, raw LLaVA caption, noun chunk root)])
PHOTOS = {
    "astronaut": ("astronaut.png", "train", [
        ("The face", [[0.30, 0.0, 0.60, 0.30]], "The image shows a smiling woman with short curly brown hair.",
         "face"),
        ("an astronaut", [[0.03, 0.0, 0.72, 1.0]], "The image shows an astronaut in an orange suit.", "astronaut"),
        ("a space shuttle", [[0.68, 0.0, 0.92, 0.55]],
         "The image shows a white space shuttle model with an orange fuel tank.", "shuttle"),
        ("an American flag", [[0.0, 0.0, 0.13, 0.90]], "The image shows a red, white and blue American flag.",
         "flag"),
        ("a helmet", [[0.53, 0.65, 1.0, 1.0]], "The image shows a black helmet with a reflective visor.", "helmet"),
        ("a mission patch", [[0.25, 0.67, 0.40, 0.80]], "The image shows a round mission patch on an orange suit.",
         "patch"),
    ]),
    "rocket": ("rocket.jpg", "train", [
        ("a rocket", [[0.45, 0.28, 0.56, 0.98]], "The image shows a tall white rocket on the launch pad.",
         "rocket"),
        ("the launch towers", [[0.0, 0.0, 0.15, 1.0], [0.85, 0.0, 1.0, 1.0]],
         "The image shows a collage of two steel lattice towers against a dark blue sky.", "towers"),
        ("bright lights", [[0.20, 0.82, 0.75, 1.0]], "The image shows bright yellow lights glowing at dusk.",
         "lights"),
    ]),
    "motorcycle": ("motorcycle_left.png", "train", [
        ("a red motorcycle", [[0.12, 0.28, 0.92, 0.95]],
         "The image shows a red motorcycle with chrome wheels parked indoors.", "motorcycle"),
        ("a metal shelf", [[0.42, 0.0, 0.98, 0.55]], "The image shows a metal shelf stacked with boxes and tools.",
         "shelf"),
        ("a fuel tank", [[0.45, 0.33, 0.65, 0.50]], "The image shows a shiny red fuel tank.", "tank"),
    ]),
    "coins": ("coins.png", "train", [
        ("old coins", [[0.03, 0.05, 0.16, 0.22], [0.20, 0.07, 0.32, 0.20], [0.37, 0.05, 0.50, 0.22],
                       [0.52, 0.06, 0.66, 0.20]],
         "The image shows a collage featuring four silver coins with engraved faces.", "coins"),
        ("a large coin", [[0.80, 0.02, 1.0, 0.27]], "The image shows a large silver coin with a portrait.", "coin"),
    ]),
    "chelsea": ("chelsea.png", "val", [
        ("the eyes", [[0.28, 0.28, 0.47, 0.52], [0.63, 0.35, 0.78, 0.58]],
         "The image shows a collage of two green cat eyes.", "eyes"),
        ("a cat", [[0.0, 0.0, 1.0, 1.0]], "The image shows a tabby cat.", "cat"),
        ("a pink nose", [[0.50, 0.62, 0.70, 0.85]], "The image shows a small pink nose with white whiskers.",
         "nose"),
    ]),
    "hubble": ("hubble_deep_field.jpg", "val", [
        ("a spiral galaxy", [[0.36, 0.42, 0.48, 0.55]], "The image shows a small spiral galaxy in deep space.",
         "galaxy"),
        ("distant stars", [[0.60, 0.10, 0.90, 0.40]], "The image shows many tiny distant stars and galaxies.",
         "stars"),
    ]),
    "coffee": ("coffee.png", "test", [
        ("a cup of coffee", [[0.28, 0.03, 0.78, 0.62]], "The image shows a white cup filled with coffee.", "cup"),
        ("a saucer", [[0.13, 0.22, 0.95, 0.97]], "The image shows a red saucer on a wooden table.", "saucer"),
        ("a spoon", [[0.52, 0.58, 0.72, 0.82]], "The image shows a silver spoon resting on the saucer.", "spoon"),
    ]),
    "camera": ("camera.png", "test", [
        ("a man", [[0.0, 0.12, 0.62, 1.0]], "The image shows a man in a black coat looking through a camera.",
         "man"),
        ("a camera", [[0.50, 0.22, 0.66, 0.48]], "The image shows a vintage film camera.", "camera"),
        ("a tripod", [[0.45, 0.45, 0.80, 1.0]], "The image shows a tall metal tripod.", "tripod"),
        ("buildings", [[0.70, 0.20, 1.0, 0.45]], "The image shows distant buildings under a gray sky.",
         "buildings"),
    ]),
    "moon": ("moon.png", "unannotated", [
        ("the moon", [[0.0, 0.0, 1.0, 1.0]], "The image shows the surface of the moon.", "moon"),
    ]),
}


def skimage_data_dir() -> str:
  """scikit-image's data folder, found without importing scikit-image."""
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("scikit-image is not installed: pip install scikit-image==0.26.0 (its wheel ships "
                            "the demo photographs)")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def kosmos_entry(entities) -> dict:
  """Kosmos-2-style record: a description naming each phrase, with its character span."""
  description, spans = "Question: What are the details of this image? Answer: It shows", {}
  for i, (phrase, bboxes, _, _) in enumerate(entities):
    description += (" and" if i else "") + " "
    spans[phrase] = {"startend": [len(description), len(description) + len(phrase)], "bboxes": bboxes}
    description += phrase
  return {"description": description + ".", "entities": spans}


class _LookupNounChunks:
  """Stands in for a spaCy pipeline in the demo: `nlp(concept).noun_chunks[0].root.text` from a table."""

  class _Span:
    def __init__(self, root):
      self.root = type("Token", (), {"text": root})()

  def __init__(self, roots: dict[str, str]):
    self.roots = roots

  def __call__(self, concept):
    root = self.roots.get(concept)
    return type("Doc", (), {"noun_chunks": [self._Span(root)] if root else []})()


def make_demo_dataset(out_dir, copies: int = 1, spacy_model: str | None = None) -> str:
  """Builds the demo under `out_dir` (replacing a previous one) and returns the dataset root."""
  out_dir = os.fspath(out_dir)
  root = os.path.join(out_dir, "mm_inp_dataset")
  if os.path.exists(root):
    shutil.rmtree(root)
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir)
  source_dir = skimage_data_dir()

  records, rows, captions, roots = {}, [], {}, {}
  for name, (source, split, entities) in PHOTOS.items():
    with Image.open(os.path.join(source_dir, source)) as im:
      base = im.convert("RGB")
    variants = [(f"skimage_{name}", base, False)]
    if split == "train":
      for j in range(1, copies):
        scale = 0.85 ** (j // 2)
        im = base.resize((max(1, int(base.width * scale)), max(1, int(base.height * scale))), Image.BILINEAR)
        variants.append((f"skimage_{name}_v{j}", ImageOps.mirror(im) if j % 2 else im, j % 2 == 1))
    for stem, image, mirrored in variants:
      ents = [(p, [[1 - b[2], b[1], 1 - b[0], b[3]] for b in boxes] if mirrored else boxes, c, r)
              for p, boxes, c, r in entities]
      common.save_image_atomic(image, os.path.join(image_dir, f"{stem}.jpg"))  # PIL's default JPEG, as download
      records[f"{stem}.jpg"] = kosmos_entry(ents)
      rows.append({"file_name": f"{stem}.jpg", "url": f"https://uploads.wikiart.org/images/skimage/{stem}.jpg",
                   "modifier": "Large", "split": split})
      for phrase, _, caption, r in ents:
        captions[(stem, phrase.lower())] = caption
        roots[phrase.lower()] = r

  annotations_path = os.path.join(out_dir, "annotations.json")
  common.atomic_write_json(annotations_path, records)
  with open(os.path.join(out_dir, "wikiart_images.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["file_name", "url", "modifier", "split"])
    writer.writeheader()
    writer.writerows(r for r in rows if r["split"] != "unannotated")

  masks_dir, entities_dir = os.path.join(root, "masks"), os.path.join(root, "entities")
  status = annotate.make_masks(annotations_path, image_dir, masks_dir)
  status |= annotate.make_entities(annotations_path, image_dir, entities_dir)
  nlp = None if spacy_model else _LookupNounChunks(roots)
  status |= text.extract_noun_chunk_roots(entities_dir, spacy_model or "", nlp=nlp)

  # what caption-masks would have written: one process, raw "The image shows ..." captions per kept mask
  llava = {}
  for stem in sorted(os.listdir(entities_dir)):
    anns = common.read_json(os.path.join(entities_dir, stem, "annotations.json"))
    llava[stem] = {mask: captions[(stem, entry["concept"])] for mask, entry in anns.items()}
  llava_path = os.path.join(out_dir, "llava.json")
  common.atomic_write_json(llava_path, {**llava, "steps": len(llava)})
  status |= text.llava_annotations_to_folder([llava_path], entities_dir)
  status |= text.clean_captions(entities_dir)
  status |= split_step.split_dataset(image_dir, masks_dir, os.path.join(out_dir, "wikiart_images.csv"))
  if status:
    raise RuntimeError(f"building the demo dataset in {out_dir} reported errors (see stderr)")
  with open(os.path.join(out_dir, "SOURCES.txt"), "w") as f:
    f.write("Photographs: scikit-image sample data (skimage/data/ of the scikit-image 0.26 wheel); see "
            "https://scikit-image.org/docs/stable/api/skimage.data.html for their sources and licences.\n"
            "Boxes, captions and noun-chunk roots: hand-written for idmp_jax's demo.\n")
  return root
