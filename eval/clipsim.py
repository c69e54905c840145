"""CLIPSim: cosine similarities with CLIP ViT-B/32 (`openai/clip-vit-base-patch32`, a local transformers folder).

As the original's `CLIPScoreText2Image` / `CLIPScoreImage2Image`: texts (padded to the batch's longest, truncated
to 77, with the attention mask) -> text tower -> pooled EOS state -> text projection; images -> vision tower ->
pooled state -> visual projection (what `CLIPTextModelWithProjection.text_embeds` and
`CLIPVisionModelWithProjection.image_embeds` are); score = `F.cosine_similarity` (raw, not clamped or scaled).
The folder is loaded once as a `CLIPModel` (transformers 5 no longer reads a tower's projection size out of a
full CLIP config when loading a single tower from it).

Image preprocessing is done here with PIL rather than by `CLIPProcessor`: the original passed `size=(224, 224)` to
transformers 4.44's slow processor, i.e. a PIL bicubic resize straight to 224x224 (aspect not kept, the centre crop
a no-op), x / 255, CLIP mean/std. transformers 5 picks a torchvision backend when torchvision is importable
(torch resize, different pixels) and a PIL one when not, so the same environment-independent PIL path is written
out (tests check it against transformers' `CLIPImageProcessorPil`). Texts are cleaned as transformers 4.44's slow
CLIPTokenizer did (`idmp_jax.data.tokenizer.basic_clean`) before the folder's tokenizer.

`masked_views` is the per-mask treatment of SPEC §7 for the inpainting table.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def gaussian_blur(x: torch.Tensor, kernel: int = 15, sigma: float = 20.0) -> torch.Tensor:
  """torchvision 0.19's `GaussianBlur(kernel, sigma)` on float (N, C, H, W): 2-D kernel outer(k1, k1) of the
  normalised sampled Gaussian, reflect padding of kernel // 2, depthwise conv."""
  half = (kernel - 1) * 0.5
  t = torch.linspace(-half, half, kernel, dtype=x.dtype, device=x.device)
  pdf = torch.exp(-0.5 * (t / sigma).pow(2))
  k1 = pdf / pdf.sum()
  k2 = torch.mm(k1[:, None], k1[None, :]).expand(x.shape[1], 1, kernel, kernel)
  return F.conv2d(F.pad(x, [kernel // 2] * 4, mode="reflect"), k2, groups=x.shape[1])


def masked_views(image01: torch.Tensor, masks: torch.Tensor) -> list[Image.Image]:
  """SPEC §7: for each mask (K, H, W), the whole image (3, H, W) in [0, 1] dimmed to 0.1, Gaussian-blurred
  (kernel 15, sigma 20, reflect), with the pixels under the mask (> 0) put back at full quality; to 8 bits by
  truncation (`to_pil_image`). The blur does not depend on the mask, so it is computed once."""
  blurred = gaussian_blur((image01 * 0.1)[None])[0]
  out = []
  for m in masks:
    view = torch.where((m > 0)[None], image01, blurred)
    out.append(Image.fromarray((view * 255).byte().permute(1, 2, 0).cpu().numpy(), mode="RGB"))
  return out


class ClipScorer:
  """CLIP text and image towers of one local folder (config.json + weights + tokenizer files)."""

  def __init__(self, folder, device="cpu"):
    from transformers import CLIPModel, CLIPTokenizer
    self.folder, self.device = os.fspath(folder), device
    self.tokenizer = CLIPTokenizer.from_pretrained(self.folder)
    self.max_length = int(min(self.tokenizer.model_max_length, 77))
    self.model = CLIPModel.from_pretrained(self.folder).eval().requires_grad_(False).to(device)
    cfg = {}
    path = os.path.join(self.folder, "preprocessor_config.json")
    if os.path.exists(path):
      with open(path, "r", encoding="utf-8") as f:
        cfg = json.load(f)
    self.mean = np.asarray(cfg.get("image_mean", MEAN), np.float32)
    self.std = np.asarray(cfg.get("image_std", STD), np.float32)
    self.resample = Image.Resampling(int(cfg.get("resample", Image.BICUBIC)))

  def pixel_values(self, images) -> torch.Tensor:
    """PIL images -> (N, 3, 224, 224): RGB, resize straight to 224x224, x * (1/255) (float64 -> float32),
    (x - mean) / std: transformers' slow CLIPImageProcessor with size=(224, 224)."""
    arrays = []
    for im in images:
      im = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), self.resample)
      x = (np.asarray(im, np.float64) * (1 / 255)).astype(np.float32)
      arrays.append(((x - self.mean) / self.std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))

  @torch.no_grad()
  def image_embeds(self, images) -> torch.Tensor:
    m = self.model
    return m.visual_projection(m.vision_model(pixel_values=self.pixel_values(images).to(self.device)).pooler_output)

  @torch.no_grad()
  def text_embeds(self, texts) -> torch.Tensor:
    from idmp_jax.data.tokenizer import basic_clean
    enc = self.tokenizer([basic_clean(t) for t in texts], padding=True, truncation=True,
                         max_length=self.max_length, return_tensors="pt")
    out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                attention_mask=enc["attention_mask"].to(self.device))
    return self.model.text_projection(out.pooler_output)

  def cosine(self, a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return F.cosine_similarity(a, b).float().cpu().tolist()
