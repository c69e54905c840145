"""LPIPS with the SqueezeNet backbone, as torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`.

Per image pair in [-1, 1]: scale to ImageNet statistics (LPIPS' ScalingLayer), run SqueezeNet 1.1's feature
stack, take the 7 ReLU outputs, normalise each over channels (x / sqrt(1e-8 + sum x^2), torchmetrics' form), square
the difference, weight channels with the learned 1x1 "lin" layer, average over space, sum over the 7 layers. The
metric is the mean over images (`reduction="mean"`).

Why the backbone is restated here: torchmetrics takes SqueezeNet from torchvision (`squeezenet1_1(weights=...)`,
downloaded on first use), and torchvision does not import beside our torch build. This file has SqueezeNet 1.1's
`features` (architecture only, torchvision's module indices so its state dict loads); the weights are read from
local files:
  backbone  torchvision's ImageNet checkpoint `squeezenet1_1-b8a52dc0.pth` (keys `features.*`; the classifier is
            ignored);
  lin       LPIPS v0.1's linear layers `squeeze.pth` (keys `lin<k>.model.1.weight`), which the torchmetrics wheel
            ships at `torchmetrics/functional/image/lpips_models/squeeze.pth` (the default when installed).
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_NAME = "squeezenet1_1-b8a52dc0.pth"
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13))  # features[a:b] ends at each tapped ReLU


def default_lin_path() -> str | None:
  """The LPIPS linear weights shipped inside the installed torchmetrics wheel (no import of torchmetrics)."""
  spec = importlib.util.find_spec("torchmetrics")
  for loc in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(loc, "functional", "image", "lpips_models", "squeeze.pth")
    if os.path.exists(path):
      return path
  return None


class Fire(nn.Module):
  def __init__(self, cin, squeeze, e1, e3):
    super().__init__()
    self.squeeze = nn.Conv2d(cin, squeeze, 1)
    self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
    self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

  def forward(self, x):
    x = F.relu(self.squeeze(x))
    return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def squeezenet1_1_features() -> nn.Sequential:
  """torchvision's SqueezeNet 1.1 `features`, same indices (0: conv, 1: ReLU, 2/5/8: ceil-mode max pools)."""
  pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
  return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
                       Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
                       Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
                       Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
                       Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))


class LPIPSSqueeze(nn.Module):
  def __init__(self):
    super().__init__()
    self.features = squeezenet1_1_features()
    self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
    self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

  def taps(self, x):
    x = (x - self.shift) / self.scale
    out = []
    for a, b in SLICES:
      for i in range(a, b):
        x = self.features[i](x)
      out.append(x)
    return out

  def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pairs in [-1, 1] -> (N,) distances."""
    if img1.min() < -1 or img2.min() < -1:  # torchmetrics' input check (its only range check for [-1, 1])
      raise ValueError("LPIPS expects images in [-1, 1]")
    total = 0
    for lin, f1, f2 in zip(self.lins, self.taps(img1), self.taps(img2)):
      f1 = f1 / torch.sqrt(1e-8 + torch.sum(f1 ** 2, dim=1, keepdim=True))
      f2 = f2 / torch.sqrt(1e-8 + torch.sum(f2 ** 2, dim=1, keepdim=True))
      total = total + lin((f1 - f2) ** 2).mean([2, 3], keepdim=True)
    return total.reshape(-1)


def load_lpips(backbone_path, lin_path, device="cpu") -> LPIPSSqueeze:
  model = LPIPSSqueeze()
  backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
  feats = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
  try:
    model.features.load_state_dict(feats, strict=True)
  except RuntimeError as e:
    raise ValueError(f"{backbone_path}: not torchvision's SqueezeNet 1.1 weights ({e})") from None
  lin = torch.load(lin_path, map_location="cpu", weights_only=True)
  for k, conv in enumerate(model.lins):
    # `model.1` follows a Dropout at index 0 (LPIPS' use_dropout=True); accept `model.0` for dropout-free files
    key = next((f"lin{k}.model.{i}.weight" for i in (1, 0) if f"lin{k}.model.{i}.weight" in lin), None)
    if key is None or tuple(lin[key].shape) != tuple(conv.weight.shape):
      raise ValueError(f"{lin_path}: no LPIPS lin{k} weight of shape {tuple(conv.weight.shape)}")
    conv.weight.data.copy_(lin[key])
  return model.eval().requires_grad_(False).to(device)
