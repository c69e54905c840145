"""`python -m eval.parity --tokenizer DIR`: eval's restated networks against the libraries the original used.

eval/fid.py, eval/lpips.py and eval/clip_iqa.py restate networks that torchmetrics takes from torch-fidelity,
torchvision and piq, which do not import beside our CPU torch build. Where they do import (a machine with
torchvision; torch-fidelity and piq installed without their dependencies), this builds random weights at the real
shapes, writes them in each library's own file format, runs both sides on the same inputs and reports the largest
differences; it exits 1 when one is above its tolerance. It is not part of CI (CI has no torchvision).
  FID       torch-fidelity FeatureExtractorInceptionV3 (2048 features) and torchmetrics' FrechetInceptionDistance
            (normalize=True, and antialias=False where torchmetrics has that switch: 1.4.0's TF1 resize)
  LPIPS     torchmetrics' _LPIPS(net="squeeze") with torchvision's squeezenet1_1 and torchmetrics' squeeze.pth
  CLIP-IQA  piq's CLIP (ResNet-50 shapes, built by piq.build_model like piq's loader) through torchmetrics'
            clip_iqa functions
  CLIPSim   torchvision GaussianBlur + to_pil_image + boolean paste-back, as the original's compute step
--tokenizer: a CLIP BPE tokenizer folder (any OpenAI CLIP checkpoint's) for the CLIP-IQA anchors.

Last run (2026-11-25, the GPU machine's CPU: torch 2.11, torchvision 0.26, torchmetrics 1.9.0, transformers 5.17,
torch-fidelity 0.4.0, piq 0.8.0): blur, CLIPSim views (uint8), LPIPS and the FID features identical (difference 0);
CLIP-IQA image features rel 4.5e-7, anchors identical, scores rel 2.4e-7; FID value rel 7e-11.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from eval import clip_iqa, clipsim, fid, lpips


def _report(name, got, want, tol) -> bool:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  abs_err = float(np.abs(got - want).max())
  rel_err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  ok = rel_err <= tol
  print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs {abs_err:.3g}, rel {rel_err:.3g} (tol {tol:g}); "
        f"reference mean |x| {float(np.abs(want).mean()):.4g}")
  return ok


def check_fid(tmp, rng) -> bool:
  from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
  torch.manual_seed(0)
  model = fid.FIDInceptionV3()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.normal_(1, 0.1)
        m.bias.normal_(0, 0.1)
  path = os.path.join(tmp, fid.WEIGHTS_NAME)
  torch.save(model.state_dict(), path)
  ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
  mine = fid.load_fid_inception(path)
  real = torch.from_numpy(rng.random((6, 3, 512, 512), dtype=np.float32))
  fake = (real + 0.2 * torch.from_numpy(rng.random((6, 3, 512, 512), dtype=np.float32))).clamp(0, 1)
  with torch.no_grad():
    ok = _report("FID Inception features vs torch-fidelity", fid.fid_features(mine, real),
                 ref((real * 255).byte())[0], 1e-5)
    from torchmetrics.image.fid import FrechetInceptionDistance
    kw = dict(feature=2048, normalize=True, feature_extractor_weights_path=path)
    try:
      tm = FrechetInceptionDistance(antialias=False, **kw)
    except TypeError:  # torchmetrics < 1.8 has no switch and always used the TF1 resize
      tm = FrechetInceptionDistance(**kw)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = fid.frechet_distance(fid.fid_features(mine, real), fid.fid_features(mine, fake))
    ok &= _report("FID value vs torchmetrics (6 vs 6 images: low-rank form vs eigvals)", [ours],
                  [float(tm.compute())], 1e-3)
  return ok


def check_lpips(tmp, rng) -> bool:
  import torchvision
  from torchmetrics.functional.image.lpips import _LPIPS
  torch.manual_seed(1)
  tv = torchvision.models.squeezenet1_1(weights=None).eval()
  path = os.path.join(tmp, lpips.BACKBONE_NAME)
  torch.save(tv.state_dict(), path)
  ref = _LPIPS(pretrained=True, net="squeeze", pnet_rand=True).eval()  # lins from torchmetrics' squeeze.pth
  for j, (a, b) in enumerate(lpips.SLICES):
    for i in range(a, b):
      ref.net.slices[j]._modules[str(i)].load_state_dict(tv.features[i].state_dict())
  mine = lpips.load_lpips(path, lpips.default_lin_path())
  x = torch.from_numpy(rng.random((3, 3, 256, 256), dtype=np.float32)) * 2 - 1
  y = (x + 0.3 * torch.from_numpy(rng.standard_normal((3, 3, 256, 256), dtype=np.float32))).clamp(-1, 1)
  with torch.no_grad():
    return _report("LPIPS (squeeze) vs torchmetrics + torchvision", mine(x, y), ref(x, y).reshape(-1), 1e-5)


def check_clip_iqa(tmp, rng, tokenizer_dir) -> bool:
  from torchmetrics.functional.multimodal.clip_iqa import (_clip_iqa_compute, _clip_iqa_get_anchor_vectors,
                                                           _clip_iqa_update)
  from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
  from piq.feature_extractors import clip as piq_clip
  torch.manual_seed(2)
  model = piq_clip.CLIP(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                        vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                        transformer_heads=8, transformer_layers=12)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # OpenAI zero-inits bn3: give every branch a signal
        m.weight.normal_(1, 0.1)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  state = model.state_dict()
  path = os.path.join(tmp, clip_iqa.WEIGHTS_NAME)
  torch.save(state, path)
  ref = piq_clip.build_model({k: v.clone() for k, v in state.items()}).float().eval()  # as piq's load()
  tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
  processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
  images = torch.from_numpy(rng.random((2, 3, 512, 512), dtype=np.float32))
  with torch.no_grad():
    anchors = _clip_iqa_get_anchor_vectors("clip_iqa", ref, processor, ["Good photo.", "Bad photo."], "cpu")
    feats = _clip_iqa_update("clip_iqa", images, ref, processor, 1.0, "cpu")
    want = _clip_iqa_compute(feats, anchors, ["quality"])
    mine = clip_iqa.load_clip_iqa(path, tok)
    got = mine(images)
    normed = (images - mine.mean) / mine.std
    ok = _report("CLIP-IQA image features vs piq", mine.model.encode_image(normed),
                 ref.encode_image(normed, pos_embedding=False), 1e-5)
    ok &= _report("CLIP-IQA anchors vs torchmetrics", torch.nn.functional.normalize(
        mine.model.encode_text(mine.anchor_ids), dim=-1), anchors, 1e-5)
    ok &= _report("CLIP-IQA scores vs torchmetrics", got, want.reshape(-1), 1e-4)
  return ok


def check_views(rng) -> bool:
  import torchvision
  from torchvision.transforms.functional import to_pil_image
  blur = torchvision.transforms.GaussianBlur(kernel_size=15, sigma=20)
  img = torch.from_numpy(rng.random((3, 512, 512), dtype=np.float32))
  ok = _report("Gaussian blur vs torchvision", clipsim.gaussian_blur((img * 0.1)[None])[0], blur(img * 0.1), 1e-6)
  mask = torch.zeros(1, 512, 512)
  mask[0, 100:300, 50:400] = 1
  edit = blur(img * 0.1)
  fg = (mask > 0).squeeze(0).expand(3, -1, -1)
  edit[fg] = img[fg]
  want = np.asarray(to_pil_image(edit))
  got = np.asarray(clipsim.masked_views(img, mask)[0])
  same = float((got == want).mean())
  print(f"{'ok  ' if same > 0.999 else 'FAIL'} CLIPSim view vs the original's steps: {same:.6f} of uint8 values equal,"
        f" max diff {int(np.abs(got.astype(int) - want.astype(int)).max())}")
  return ok and same > 0.999


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m eval.parity", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
  args = p.parse_args(argv)
  torch.set_grad_enabled(False)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    results = [check_views(rng), check_lpips(tmp, rng), check_clip_iqa(tmp, rng, args.tokenizer),
               check_fid(tmp, rng)]
  return 0 if all(results) else 1


if __name__ == "__main__":
  sys.exit(main())
