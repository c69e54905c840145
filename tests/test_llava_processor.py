"""LLaVA-NeXT image processor and image-token expansion against transformers (PIL backend), value by value."""
import numpy as np
import pytest
from PIL import Image

from idmp_jax.data import llava_processor as lp
from idmp_jax.models import llava_next as ln

transformers = pytest.importorskip("transformers")

TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))


def _reference(config: lp.ImageProcessorConfig):
  return transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": config.shortest_edge},
      crop_size={"height": config.crop_size[0], "width": config.crop_size[1]},
      image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])


def _images(rng, sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("scale", ["stock", "tiny"])
def test_preprocess_matches_transformers(rng, scale):
  if scale == "stock":
    config = lp.ImageProcessorConfig(shortest_edge=336, crop_size=(336, 336))
    images = _images(rng, [(300, 500), (700, 350), (1000, 200), (336, 336)])
  else:
    config = lp.ImageProcessorConfig(shortest_edge=32, crop_size=(32, 32), image_grid_pinpoints=TINY_PINPOINTS)
    images = _images(rng, [(40, 70), (90, 30), (17, 23)])
  # PIL inputs too: RGBA (composited onto white) and grayscale.
  rgba = rng.integers(0, 256, (45, 61, 4), dtype=np.uint8)
  images += [Image.fromarray(rgba, "RGBA"), Image.fromarray(images[0][..., 0], "L")]
  ref = _reference(config)(images, return_tensors="np")
  ours = lp.preprocess(images, config)
  assert ours["pixel_values"].dtype == np.float32
  assert ours["pixel_values"].shape == ref["pixel_values"].shape
  np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
  np.testing.assert_array_equal(ours["image_sizes"], ref["image_sizes"])
  assert np.abs(ours["pixel_values"]).max() > 1.0  # Real content, not zeros.


def test_config_from_stock_json():
  raw = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
         "do_normalize": True, "do_rescale": True, "do_resize": True, "do_pad": True,
         "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
         "image_mean": list(lp.OPENAI_CLIP_MEAN), "image_std": list(lp.OPENAI_CLIP_STD),
         "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
         "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
  config = lp.ImageProcessorConfig.from_dict(raw)
  assert config.base_size == (336, 336) and config.tile_size == 336
  with pytest.raises(ValueError, match="do_warp"):
    lp.ImageProcessorConfig.from_dict(dict(raw, do_warp=True))


def _word_tokenizer():
  """A word-level tokenizer with `<image>` as a special token (the vicuna tokenizer is not available offline)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "describe", "the", "objects", "red", "gray"]
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                             eos_token="</s>", pad_token="<pad>", padding_side="left")
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  return tok


def test_image_token_placement_matches_processor(rng):
  tok = _word_tokenizer()
  image_token = tok.convert_tokens_to_ids("<image>")
  model_config = ln.LlavaNextConfig(image_token_index=image_token)
  config = lp.ImageProcessorConfig(shortest_edge=336, crop_size=(336, 336))
  # num_additional_image_tokens=1 (the CLS token) as in the llava-hf processor_config.json.
  processor = transformers.LlavaNextProcessor(image_processor=_reference(config), tokenizer=tok, patch_size=14,
                                              vision_feature_select_strategy="default",
                                              num_additional_image_tokens=1)
  images = _images(rng, [(300, 500), (700, 350), (200, 900)])
  texts = ["USER: <image> describe the objects ASSISTANT:", "USER: <image> red ASSISTANT:",
           "<image> gray the"]
  ref = processor(images=images, text=texts, padding=True, return_tensors="np")
  sizes = lp.preprocess(images, config)["image_sizes"]
  seqs = [lp.expand_image_tokens(tok(t)["input_ids"], [s], model_config) for t, s in zip(texts, sizes)]
  ids, mask = lp.pad_batch(seqs, tok.pad_token_id, "left")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_num_image_features_matches_processor_formula(rng):
  """The model-side count (ours) against the processor's closed form over many sizes, stock config."""
  config = ln.LlavaNextConfig()
  processor = object.__new__(transformers.LlavaNextProcessor)  # Only the counting methods are used.
  processor.image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in ln.STOCK_PINPOINTS]})
  processor.patch_size, processor.num_additional_image_tokens = 14, 1
  for h, w in rng.integers(16, 2500, (300, 2)):
    expected = processor._get_number_of_features(int(h), int(w), 336, 336) - 1  # "default": minus CLS.
    assert ln.num_image_features((h, w), config) == expected, (h, w)


def test_expand_and_pad_errors():
  config = ln.LlavaNextConfig(image_token_index=7)
  with pytest.raises(ValueError, match="2 images but 1"):
    lp.expand_image_tokens([1, 7, 3], [(10, 10), (10, 10)], config)
  with pytest.raises(ValueError, match="more <image> tokens"):
    lp.expand_image_tokens([7, 7], [(10, 10)], config)
  ids, mask = lp.pad_batch([[5, 6, 7], [8]], 0, "right")
  np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
