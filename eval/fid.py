"""FID: torch-fidelity's "FID Inception" V3 (pool features, 2048-d) and the Fréchet distance of torchmetrics.

The original computes `torchmetrics.FrechetInceptionDistance(feature=2048, normalize=True)` (torchmetrics 1.4.0):
images in [0, 1] -> `(x * 255).byte()` (truncation) -> torch-fidelity's `FeatureExtractorInceptionV3`, whose
forward resizes to 299x299 with TensorFlow 1.x's bilinear rule (not torch's), maps to (x - 128) / 128 and runs the
TF-compatible Inception (average pools that ignore padding, a max pool in the last block).

Why the network is restated here instead of imported: torchmetrics builds it from `torch_fidelity`, and
torch-fidelity imports torchvision at package import, which does not import beside our torch build. This file
has the architecture only; the weights are torch-fidelity's released file
`weights-inception-2015-12-05-6726825d.pth` (converted from TensorFlow's 2015-12-05 Inception), read from a local
path, never downloaded. Module names equal torch-fidelity's so its state dict loads key for key.
Also why not torchmetrics >= 1.8's default: it resizes with torch's antialiased bilinear (`antialias=True`), a
different FID from the one the paper reports; the TF1 rule here is the one torchmetrics 1.4.0 used.

The Fréchet distance itself is torchmetrics' own: `frechet_distance` feeds cached features to a
`FrechetInceptionDistance` whose feature extractor is the identity, so sums, covariances (float64) and the
eigenvalue square root are exactly torchmetrics' code (sets smaller than the feature dimension take an exact
low-rank form instead, see there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
  """(N, C, H, W) float -> (N, C, size, size) as TF 1.x `resize_bilinear(align_corners=False)`: the source of
  output index i is i * (in / out) (no half-pixel offset), interpolating between floor and floor + 1 (clamped).
  Same float32 operation order as torch-fidelity's 'slow' path (bit-exact on CPU)."""
  def axis(n_in):
    pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
    lo = pos.long()
    return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

  y_lo, y_hi, dy = axis(x.shape[2])
  x_lo, x_hi, dx = axis(x.shape[3])
  top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
  dx = dx.view(1, 1, 1, size)
  row0 = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx
  row1 = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
  return row0 + (row1 - row0) * dy.view(1, 1, size, 1)


class BasicConv2d(nn.Module):
  """conv (no bias) + BatchNorm(eps 1e-3, TF's) + ReLU."""

  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TF's average pool divides by the number of real (unpadded) pixels
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x),
                      self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, **row)
    self.branch7x7_3 = BasicConv2d(c7, 192, **col)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d7 = x
    for i in range(1, 6):
      d7 = getattr(self, f"branch7x7dbl_{i}")(d7)
    return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
  """`max_pool`: the last block of TF's graph pools by max, not average (kept: the weights were trained so)."""

  def __init__(self, cin, max_pool: bool):
    super().__init__()
    self.max_pool = max_pool
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, **row)
    self.branch3x3_2b = BasicConv2d(384, 384, **col)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
    return torch.cat([self.branch1x1(x),
                      self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                      self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
  """uint8 (N, 3, H, W) -> (N, 2048) float32 pool features (torch-fidelity's feature '2048')."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, max_pool=False)
    self.Mixed_7c = InceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # logits head: in the weights file, unused for FID

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
      raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    x = resize_bilinear_tf1(x.float(), INPUT_SIZE)
    x = (x - 128) / 128
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).float()


def load_fid_inception(path, device="cpu") -> FIDInceptionV3:
  """The network with torch-fidelity's weights file at `path` (every key must match)."""
  state = torch.load(path, map_location="cpu", weights_only=True)
  model = FIDInceptionV3()
  try:
    model.load_state_dict(state, strict=True)
  except RuntimeError as e:
    raise ValueError(f"{path}: not torch-fidelity's FID Inception weights ({e})") from None
  return model.eval().requires_grad_(False).to(device)


def fid_features(model: FIDInceptionV3, images01: torch.Tensor) -> torch.Tensor:
  """torchmetrics' `normalize=True` input path: [0, 1] float -> (x * 255).byte() (truncation) -> features."""
  return model((images01 * 255).byte())


class _Precomputed(nn.Module):
  """Identity "feature extractor": lets torchmetrics' FID run on features cached to disk."""

  def __init__(self, num_features: int):
    super().__init__()
    self.num_features = num_features

  def forward(self, x):
    return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
  """FID of two feature sets (N, D), N >= 2 each, as torchmetrics computes it.

  With more samples than dimensions (a real test set), torchmetrics itself computes it. With fewer (a demo, a
  test), both covariances are rank-deficient: torchmetrics' eigendecomposition of the D x D product is then
  ill-conditioned (and takes half a minute for D = 2048 on a small CPU), so the same quantity is computed exactly
  from the centred samples: with S1 = A^T A, S2 = B^T B, tr sqrt(S1 S2) = sum of singular values of A B^T."""
  if min(len(real), len(fake)) - 1 >= real.shape[1]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())
  x, y = real.double(), fake.double()
  a = (x - x.mean(0)) / (len(x) - 1) ** 0.5
  b = (y - y.mean(0)) / (len(y) - 1) ** 0.5
  mean_term = (x.mean(0) - y.mean(0)).square().sum()
  return float(mean_term + a.square().sum() + b.square().sum() - 2 * torch.linalg.svdvals(a @ b.T).sum())
