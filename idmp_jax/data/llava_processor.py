"""LLaVA-NeXT image preprocessing and image-token expansion, matching transformers' LlavaNextImageProcessor (the
PIL/NumPy backend, which is what the reference environment gets without torchvision) value for value.

Per image (SPEC §8: at the original resolution):
  1. RGB (alpha composited onto white); image_sizes = (H, W).
  2. anyres: the best resolution among `image_grid_pinpoints`; the image resized (bicubic, PIL) to fit it with
     its aspect kept, zero-padded to it centred, cut into crop-size tiles (row-major).
  3. the base view: the whole image resized straight to (shortest_edge, shortest_edge).
  4. each view [base, tiles...]: shortest-edge resize, centre crop, x/255, CLIP mean/std normalisation.
  5. the batch is zero-padded on the view axis: pixel_values (B, max_views, 3, crop, crop) float32.
Resizing uses PIL exactly as transformers does (uint8 in, uint8 out), the rest is NumPy.

Text: a prompt is tokenised with ONE `<image>` token; `expand_image_tokens` repeats it to the number of image
features the model produces for that image (transformers' LlavaNextProcessor does the same on the text).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from idmp_jax.convert import torch_format
from idmp_jax.models.llava_next import num_image_features, select_best_resolution

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STOCK_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """preprocessor_config.json fields (defaults = transformers' class defaults; the llava-v1.6 folders set
  shortest_edge and crop 336)."""
  shortest_edge: int | None = 224          # size {"shortest_edge": s} ...
  size_hw: tuple[int, int] | None = None   # ... or size {"height": h, "width": w}
  crop_size: tuple[int, int] = (224, 224)
  image_grid_pinpoints: tuple[tuple[int, int], ...] = STOCK_PINPOINTS
  resample: int = 3  # PIL bicubic
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  do_pad: bool = True
  do_convert_rgb: bool = True

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "preprocessor_config.json") -> "ImageProcessorConfig":
    supported = {k: None for k in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                                   "image_mean", "image_std", "do_pad", "do_convert_rgb", "image_grid_pinpoints")}
    supported.update({
        "size": lambda v: isinstance(v, dict) and ("shortest_edge" in v or {"height", "width"} <= set(v)),
        "crop_size": lambda v: v is None or (isinstance(v, dict) and {"height", "width"} <= set(v)),
        "resample": lambda v: v in (0, 1, 2, 3, 4, 5),
        "image_processor_type": lambda v: v.startswith("LlavaNextImageProcessor"),
        "processor_class": None, "aspect_ratio_setting": lambda v: v == "anyres", "default_to_square": lambda v: not v,
    })
    torch_format.check_config_keys(cfg, supported, source=source)
    d = cls()
    size = cfg.get("size", {"shortest_edge": d.shortest_edge})
    crop = cfg.get("crop_size") or {"height": d.crop_size[0], "width": d.crop_size[1]}
    get = lambda k: cfg.get(k, getattr(d, k))
    return cls(
        shortest_edge=size.get("shortest_edge"),
        size_hw=(size["height"], size["width"]) if "shortest_edge" not in size else None,
        crop_size=(crop["height"], crop["width"]),
        image_grid_pinpoints=tuple(tuple(p) for p in get("image_grid_pinpoints")), resample=get("resample"),
        do_resize=get("do_resize"), do_center_crop=get("do_center_crop"), do_rescale=get("do_rescale"),
        rescale_factor=get("rescale_factor"), do_normalize=get("do_normalize"),
        image_mean=tuple(get("image_mean")), image_std=tuple(get("image_std")), do_pad=get("do_pad"),
        do_convert_rgb=get("do_convert_rgb"))

  @classmethod
  def load(cls, folder: str) -> "ImageProcessorConfig":
    path = os.path.join(folder, "preprocessor_config.json")
    return cls.from_dict(torch_format.read_json(path), source=path)

  @property
  def base_size(self) -> tuple[int, int]:
    """The size the whole image is resized to for the base view."""
    return self.size_hw if self.size_hw else (self.shortest_edge, self.shortest_edge)

  @property
  def tile_size(self) -> int:
    """The anyres tile size: crop height (else the resize size), as transformers picks it."""
    return self.crop_size[0] if self.crop_size else self.base_size[0]


# ----------------------------------------------------------------------------------------------------------------
# Steps.


def to_rgb_array(image) -> np.ndarray:
  """PIL image or uint8 array (H, W[, C]) -> uint8 (H, W, 3), transparency composited onto white."""
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      return np.array(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
    return np.array(image.convert("RGB"))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8 (H, W, C), got {a.dtype}")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image arrays must be (H, W), (H, W, 1|3|4), got shape {a.shape}")
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:
    alpha = a[..., 3:4] / 255
    return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return a


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """uint8 HWC resize through PIL (as transformers' PIL backend: same library, same filter)."""
  return np.array(Image.fromarray(image).resize((width, height), resample=resample))


def fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
  """The size that fits (height, width) into `target` keeping the aspect (transformers' get_patch_output_size)."""
  th, tw = target
  scale_w, scale_h = tw / width, th / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), th), tw
  return th, min(math.ceil(width * scale_h), tw)


def _shortest_edge_size(height: int, width: int, s: int) -> tuple[int, int]:
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(s * long / short)
  return (new_long, s) if width <= height else (s, new_long)


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
  h, w = image.shape[:2]
  if h < ch or w < cw:  # The reference zero-pads a too-small image (centred, ceil) before cropping.
    nh, nw = max(h, ch), max(w, cw)
    out = np.zeros((nh, nw) + image.shape[2:], image.dtype)
    top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[top:top + h, left:left + w] = image
    image, h, w = out, nh, nw
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


def anyres_views(image: np.ndarray, config: ImageProcessorConfig) -> list[np.ndarray]:
  """[base view, tiles...] as uint8 HWC arrays, before the per-view resize/crop/normalise."""
  h, w = image.shape[:2]
  target = select_best_resolution((h, w), config.image_grid_pinpoints)
  nh, nw = fit_size(h, w, target)
  fitted = resize(image, nh, nw, config.resample)
  py, ry = divmod(target[0] - nh, 2)
  px, rx = divmod(target[1] - nw, 2)
  padded = np.pad(fitted, ((py, py + ry), (px, px + rx), (0, 0)))
  t = config.tile_size
  tiles = [padded[i:i + t, j:j + t] for i in range(0, target[0], t) for j in range(0, target[1], t)]
  base = resize(image, *config.base_size, config.resample)
  return [base] + tiles


def normalize_view(view: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
  """One view: resize, centre crop, rescale, normalise -> float32 CHW."""
  if config.do_resize:
    size = config.size_hw or _shortest_edge_size(*view.shape[:2], config.shortest_edge)
    view = resize(view, *size, config.resample)
  if config.do_center_crop:
    view = _center_crop(view, *config.crop_size)
  x = view.transpose(2, 0, 1)
  if config.do_rescale:  # float64 product then float32, as the reference.
    x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  if config.do_normalize:
    x = x.astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)[:, None, None]
    std = np.asarray(config.image_std, np.float32)[:, None, None]
    x = (x - mean) / std
  return x


def preprocess(images: Sequence[Any], config: ImageProcessorConfig) -> dict[str, np.ndarray]:
  """Images (PIL or uint8 HWC arrays) -> {"pixel_values": (B, max_views, 3, h, w) float32,
  "image_sizes": (B, 2) int64 (H, W)}, as LlavaNextImageProcessor(images, return_tensors="np")."""
  batch, sizes = [], []
  for image in images:
    rgb = to_rgb_array(image) if config.do_convert_rgb else np.asarray(image)
    sizes.append(rgb.shape[:2])
    batch.append(np.stack([normalize_view(v, config) for v in anyres_views(rgb, config)]))
  if config.do_pad:
    n = max(len(x) for x in batch)
    batch = [np.pad(x, ((0, n - len(x)), (0, 0), (0, 0), (0, 0))) for x in batch]
  return {"pixel_values": np.stack(batch), "image_sizes": np.asarray(sizes, np.int64)}


# ----------------------------------------------------------------------------------------------------------------
# Text.


def expand_image_tokens(token_ids: Sequence[int], image_sizes: Sequence[Sequence[int]], model_config,
                        ) -> list[int]:
  """Repeats each `<image>` token (config.image_token_index) to the number of features of its image, in order
  (`image_sizes` holds one (H, W) per `<image>` occurrence)."""
  image_token = model_config.image_token_index
  out, k = [], 0
  for t in token_ids:
    if t == image_token:
      if k >= len(image_sizes):
        raise ValueError(f"more <image> tokens than images ({len(image_sizes)})")
      out.extend([t] * num_image_features(tuple(image_sizes[k]), model_config))
      k += 1
    else:
      out.append(t)
  if k != len(image_sizes):
    raise ValueError(f"{len(image_sizes)} images but {k} <image> tokens")
  return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left",
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (input_ids (B, T) int32, attention_mask (B, T) int32), padded on `side` to `length`
  (default: the longest)."""
  if side not in ("left", "right"):
    raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
  t = max(len(s) for s in sequences) if length is None else length
  ids = np.full((len(sequences), t), pad_id, np.int32)
  mask = np.zeros((len(sequences), t), np.int32)
  for i, s in enumerate(sequences):
    if len(s) > t:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {t}")
    sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
    ids[i, sl], mask[i, sl] = s, 1
  return ids, mask
