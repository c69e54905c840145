"""caption-masks through our JAX LLaVA-NeXT (the CLI's default backend) against the original's transformers
captioner on the same tiny random llava-hf folder: the same greedy tokens and the same captions."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import caption
from data_prep.cli import main
from tests.data_fixtures import demo_root  # noqa: F401

pytest.importorskip("torch")
STEM = "skimage_astronaut"  # 5 crops: with --batch-size 3, a full batch and a short one (padded by our captioner)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  from idmp_jax.tiny_llava import make_tiny_llava
  folder = make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))
  # llava-hf folders also ship this (transformers' processor reads its image-token count from it; ours computes
  # it from config.json). patch_size is the tiny vision tower's; +1 for its CLS token, as the stock file.
  with open(os.path.join(folder, "processor_config.json"), "w") as f:
    json.dump({"processor_class": "LlavaNextProcessor", "image_token": "<image>", "patch_size": 8,
               "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}, f)
  return folder


def test_jax_captioner_equals_transformers(demo_root, llava_dir, tmp_path, monkeypatch):  # noqa: F811
  entities = tmp_path / "entities"
  shutil.copytree(os.path.join(demo_root, "entities", STEM), entities / STEM)
  items = caption.work_items(str(entities), 1, 0)
  images = [Image.open(entities / stem / f"{mask}.png").convert("RGB") for stem, mask, _ in items]
  prompts = [caption.caption_prompt(concept) for _, _, concept in items]
  assert len(items) == 5 and len({im.size for im in images}) > 1  # crops of different shapes

  made = []  # the captioner the CLI builds by default, kept to compare its tokens below

  class Kept(caption.JaxLlavaCaptioner):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(caption, "JaxLlavaCaptioner", Kept)
  args = ["caption-masks", "--entities-dir", str(entities), "--model-id", llava_dir, "--batch-size", "3",
          "--backup-dir", str(tmp_path / "backups")]
  assert main(args) == 0 and len(made) == 1
  final = json.loads((tmp_path / "backups" / "backup_0_final.json").read_text())
  ours = [final[stem][mask] for stem, mask, _ in items]

  reference = caption.TransformersLlavaCaptioner(llava_dir)
  assert ours == reference(images, prompts)
  # Random weights: some rows stop at a token holding ".", others run to the 40-token limit; so both endings and
  # the prompt/answer split are exercised, not just empty answers.
  answers = [c[len("The image shows"):] for c in ours]
  assert all(c.startswith("The image shows") for c in ours) and all(answers)
  assert any(a.endswith(".") for a in answers) and not all(a.endswith(".") for a in answers)

  # Greedy tokens, first batch: ours (up to each row's end) = transformers' new tokens, which pads after them.
  _, tokens, lengths = made[0].generate(images[:3], prompts[:3])
  ids = reference.generate(images[:3], prompts[:3]).numpy()
  new = ids[:, ids.shape[1] - max(lengths):]
  pad = reference.model.generation_config.pad_token_id  # what transformers fills finished rows with
  pad = pad if pad is not None else reference.model.generation_config.eos_token_id
  for row, ref, n in zip(tokens, new, lengths):
    np.testing.assert_array_equal(row[:n], ref[:n])
    assert (ref[n:] == pad).all()

