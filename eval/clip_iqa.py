"""CLIP-IQA as torchmetrics' `CLIPImageQualityAssessment()` with its defaults (torchmetrics 1.4.0, piq 0.8).

Defaults: model "clip_iqa" = OpenAI's CLIP ResNet-50 as piq loads it, prompts ("quality",) = the pair
("Good photo.", "Bad photo."), data_range 1. Per image in [0, 1] at its own size (512x512 here, no resize):
normalise with CLIP's mean/std, encode with the ResNet-50 tower WITHOUT its attention-pool positional embedding
(`pos_embedding=False`, which is what lets any size through), L2-normalise; anchors = the text tower's embeddings of
the two prompts (tokenised with CLIP's BPE, zero-padded to 77, pooled at the highest token id = EOT),
L2-normalised; score = softmax(100 * [cos(good), cos(bad)])[0]. The metric is the mean over images.

Why restated: torchmetrics takes this model from `piq`, whose package import pulls torchvision (and then downloads
RN50.pt). This file has the architecture (OpenAI CLIP's ModifiedResNet and text transformer, OpenAI's parameter
names) and reads the weights from a local copy of OpenAI's `RN50.pt` (TorchScript archive, or a plain state dict
of the same keys). Like piq's loader, conv/linear/attention weights pass through fp16 (OpenAI's
`convert_weights`) before the model runs in fp32; for OpenAI's file, stored in fp16, that is a no-op.
The anchor prompts are tokenised with the CLIP tokenizer of the CLIPSim model folder: every OpenAI CLIP checkpoint
shares that BPE vocabulary (torchmetrics uses openai/clip-vit-base-patch16's for the same reason).
"""
from __future__ import annotations

import warnings
import zipfile
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "RN50.pt"
PROMPTS = ("Good photo.", "Bad photo.")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _bn_conv(cin, cout, k, **kw):
  return nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout)


class Bottleneck(nn.Module):
  """OpenAI's anti-aliased bottleneck: stride by an average pool after conv2 (and before the shortcut conv)."""

  def __init__(self, cin, planes, stride=1):
    super().__init__()
    self.conv1, self.bn1 = _bn_conv(cin, planes, 1)
    self.conv2, self.bn2 = _bn_conv(planes, planes, 3, padding=1)
    self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
    self.conv3, self.bn3 = _bn_conv(planes, planes * 4, 1)
    self.downsample = None
    if stride > 1 or cin != planes * 4:
      conv, bn = _bn_conv(cin, planes * 4, 1)
      self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)), ("0", conv), ("1", bn)]))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
  def __init__(self, spacial_dim, dim, heads, out_dim):
    super().__init__()
    self.positional_embedding = nn.Parameter(torch.zeros(spacial_dim ** 2 + 1, dim))  # unused: pos_embedding=False
    self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.c_proj = nn.Linear(dim, out_dim)
    self.heads = heads

  def forward(self, x):
    """(N, C, H, W) -> (N, out): the mean token attends over [mean, pixels]; no positional embedding."""
    n, c = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)                        # (N, HW, C)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)
    split = lambda t: t.reshape(n, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
    q = split(self.q_proj(tokens[:, :1]))
    out = F.scaled_dot_product_attention(q, split(self.k_proj(tokens)), split(self.v_proj(tokens)))
    return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
  def __init__(self, layers, out_dim, heads, resolution, width):
    super().__init__()
    self.conv1, self.bn1 = _bn_conv(3, width // 2, 3, stride=2, padding=1)
    self.conv2, self.bn2 = _bn_conv(width // 2, width // 2, 3, padding=1)
    self.conv3, self.bn3 = _bn_conv(width // 2, width, 3, padding=1)
    cin = width
    for i, (planes, n) in enumerate(zip((width, width * 2, width * 4, width * 8), layers)):
      blocks = [Bottleneck(cin, planes, 1 if i == 0 else 2)] + [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      cin = planes * 4
    self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, out_dim)

  def forward(self, x):
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = F.relu(bn(conv(x)))
    x = F.avg_pool2d(x, 2)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.attnpool(x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(d, heads)
    self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("c_proj", nn.Linear(4 * d, d))]))

  def forward(self, x, mask):  # x: (L, N, D), as OpenAI's
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = self.mlp.c_fc(self.ln_2(x))
    return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


def sizes_from_state(state: dict) -> dict:
  """CLIPResNet's constructor arguments read off a state dict's shapes (as OpenAI's build_model does)."""
  return dict(
      layers=tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)),
      width=state["visual.layer1.0.conv1.weight"].shape[0],
      grid=round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5),
      embed=state["text_projection"].shape[1],
      context=state["positional_embedding"].shape[0],
      text_width=state["positional_embedding"].shape[1],
      text_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
      vocab=state["token_embedding.weight"].shape[0])


class CLIPResNet(nn.Module):
  """OpenAI CLIP with a ModifiedResNet image tower (RN50: layers (3, 4, 6, 3), width 64, grid 7, embed 1024,
  context 77, text width 512, 12 text layers, vocab 49408). Heads: width * 32 // 64 (image), text width // 64."""

  def __init__(self, layers, width, grid, embed, context, text_width, text_layers, vocab):
    super().__init__()
    self.visual = ModifiedResNet(layers, embed, width * 32 // 64, grid * 32, width)
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(text_width, text_width // 64)
                                               for _ in range(text_layers))
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(torch.zeros(context, text_width))
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.zeros(text_width, embed))
    self.logit_scale = nn.Parameter(torch.zeros(()))
    self.register_buffer("causal", torch.full((context, context), float("-inf")).triu_(1), persistent=False)

  def encode_image(self, x):
    return self.visual(x)

  def encode_text(self, ids):
    x = (self.token_embedding(ids) + self.positional_embedding).transpose(0, 1)
    for block in self.transformer.resblocks:
      x = block(x, self.causal)
    x = self.ln_final(x.transpose(0, 1))
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection  # EOT = the highest token id


def _fp16_round_trip(model: nn.Module):
  """OpenAI's convert_weights (which piq's loader applies) followed by piq's `.float()`."""
  def rt(t):
    if t is not None:
      t.data = t.data.half().float()
  for m in model.modules():
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
      rt(m.weight)
      rt(m.bias)
    if isinstance(m, nn.MultiheadAttention):
      rt(m.in_proj_weight)
      rt(m.in_proj_bias)
    for name in ("text_projection", "proj"):
      if isinstance(getattr(m, name, None), torch.Tensor):
        rt(getattr(m, name))


def read_clip_state(path) -> dict:
  """State dict of OpenAI's RN50.pt (a TorchScript archive) or of a plain `torch.save(state_dict)` file."""
  if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
    with warnings.catch_warnings():  # OpenAI's own file is TorchScript; jit.load is deprecated, not gone
      warnings.simplefilter("ignore", DeprecationWarning)
      state = torch.jit.load(path, map_location="cpu").state_dict()
  else:
    state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}


class ClipIQA(nn.Module):
  def __init__(self, model: CLIPResNet, anchor_ids: torch.Tensor):
    super().__init__()
    self.model = model
    self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("anchor_ids", anchor_ids, persistent=False)

  def forward(self, images01: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) probability of "Good photo." against "Bad photo."."""
    feats = self.model.encode_image((images01 - self.mean) / self.std).float()
    feats = feats / feats.norm(p=2, dim=-1, keepdim=True)
    anchors = self.model.encode_text(self.anchor_ids).float()
    anchors = anchors / anchors.norm(p=2, dim=-1, keepdim=True)
    logits = 100 * feats @ anchors.t()
    return logits.reshape(len(feats), -1, 2).softmax(-1)[:, 0, 0]


def anchor_token_ids(tokenizer, context: int = 77) -> torch.Tensor:
  """The prompts with BOS/EOS, zero-padded to the context (torchmetrics' `_clip_iqa_get_anchor_vectors`)."""
  from idmp_jax.data.tokenizer import basic_clean
  ids = torch.zeros(len(PROMPTS), context, dtype=torch.long)
  for row, tokens in zip(ids, tokenizer([basic_clean(p) for p in PROMPTS])["input_ids"]):
    row[:len(tokens)] = torch.tensor(tokens)
  return ids


def load_clip_iqa(weights_path, tokenizer, device="cpu") -> ClipIQA:
  state = read_clip_state(weights_path)
  if "visual.attnpool.positional_embedding" not in state:
    raise ValueError(f"{weights_path}: not an OpenAI CLIP ResNet checkpoint (no visual.attnpool)")
  model = CLIPResNet(**sizes_from_state(state))
  try:
    model.load_state_dict(state, strict=True)
  except RuntimeError as e:
    raise ValueError(f"{weights_path}: does not match OpenAI's CLIP ResNet layout ({e})") from None
  _fp16_round_trip(model)
  context = model.positional_embedding.shape[0]
  return ClipIQA(model.float(), anchor_token_ids(tokenizer, context)).eval().requires_grad_(False).to(device)
