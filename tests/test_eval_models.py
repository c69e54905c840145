"""Known-answer tests of eval's image metrics: FID (resize, Fréchet distance, self-distance), PSNR pooling, LPIPS,
CLIP-IQA and CLIPSim, with random weights saved to local files (nothing is downloaded)."""
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image

from eval import clip_iqa, clipsim, fid, inpainting, lpips


# ----------------------------------------------------------------------------------------------- builders
def tiny_clip_folder(path) -> str:
  """A tiny random transformers CLIPModel (224 px ViT, full 49,408-token vocabulary) with a real CLIP BPE tokenizer
  in one folder: the layout of openai/clip-vit-base-patch32."""
  from transformers import CLIPConfig, CLIPModel

  from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder
  torch.manual_seed(0)
  cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=77),
                   vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4),
                   projection_dim=16)
  model = CLIPModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(path)
  model.save_pretrained(folder)
  make_clip_tokenizer_folder(folder)
  return folder


def tiny_clip_resnet_file(path) -> str:
  """A tiny OpenAI-layout CLIP ResNet with random weights and BatchNorm statistics, saved as a state dict."""
  torch.manual_seed(1)
  model = clip_iqa.CLIPResNet(layers=(1, 1, 1, 1), width=8, grid=7, embed=16, context=77, text_width=64,
                              text_layers=1, vocab=49408)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      is_bn = ".bn" in name or "downsample.1" in name
      if name.endswith("running_var"):
        t.uniform_(0.5, 1.5)
      elif name.endswith(("running_mean", "bias")):
        t.normal_(0, 0.1)
      elif is_bn and name.endswith("weight"):
        t.normal_(1, 0.1)
      elif t.dtype.is_floating_point and t.dim() >= 1:
        t.normal_(0, t[0].numel() ** -0.5 if t.dim() > 1 else 0.1)
  torch.save(model.state_dict(), path)
  return str(path)


def random_inception_file(path) -> str:
  """The real FID Inception architecture with random weights (and BatchNorm statistics), as a local file."""
  torch.manual_seed(2)
  model = fid.FIDInceptionV3()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):  # He init: the signal must survive ~50 layers for features to differ
        m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  torch.save(model.state_dict(), path)
  return str(path)


def random_lpips_files(tmp_path):
  """torchvision-layout SqueezeNet 1.1 weights (with its classifier, which must be ignored) and LPIPS lin weights."""
  torch.manual_seed(3)
  feats = lpips.squeezenet1_1_features()
  state = {f"features.{k}": v for k, v in feats.state_dict().items()}
  state["classifier.1.weight"], state["classifier.1.bias"] = torch.randn(1000, 512, 1, 1), torch.randn(1000)
  backbone = tmp_path / "squeezenet1_1-b8a52dc0.pth"
  torch.save(state, backbone)
  lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(lpips.CHANNELS)}
  lin_path = tmp_path / "squeeze.pth"
  torch.save(lin, lin_path)
  return str(backbone), str(lin_path)


# ----------------------------------------------------------------------------------------------- FID
def tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
  """TF 1.x resize_bilinear(align_corners=False) written out pixel by pixel in float64."""
  h, w = img.shape
  out = np.zeros((size, size))
  for i in range(size):
    y = i * h / size
    y0 = int(np.floor(y))
    y1, fy = min(y0 + 1, h - 1), y - y0
    for j in range(size):
      x = j * w / size
      x0 = int(np.floor(x))
      x1, fx = min(x0 + 1, w - 1), x - x0
      top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
      bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
      out[i, j] = top + (bottom - top) * fy
  return out


@pytest.mark.parametrize("shape", [(37, 23), (8, 8), (60, 45)])
def test_tf1_resize_matches_pixelwise_definition(shape, rng):
  img = rng.integers(0, 256, size=shape).astype(np.float32)
  got = fid.resize_bilinear_tf1(torch.from_numpy(img)[None, None], 29)[0, 0].numpy()
  np.testing.assert_allclose(got, tf1_resize_reference(img.astype(np.float64), 29), rtol=0, atol=1e-3)


def scipy_frechet(x, y) -> float:
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_closed_form(rng):
  d = 12
  a = rng.normal(size=(d, d))
  x = rng.normal(size=(400, d)) @ a
  y = rng.normal(size=(300, d)) @ (a + 0.3 * rng.normal(size=(d, d))) + 0.5
  got = fid.frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(y).float())
  want = scipy_frechet(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
  assert want > 1
  assert got == pytest.approx(want, rel=1e-4)


def test_frechet_distance_low_rank_form_equals_torchmetrics(rng):
  """Fewer samples than dimensions: the exact low-rank form agrees with torchmetrics' eigenvalue computation."""
  from torchmetrics.image.fid import _compute_fid
  x, y = rng.normal(size=(9, 30)), rng.normal(size=(7, 30)) * 2 + 0.3
  got = fid.frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  want = float(_compute_fid(xt.mean(0), torch.cov(xt.T), yt.mean(0), torch.cov(yt.T)))
  assert got == pytest.approx(want, rel=1e-6)
  assert got == pytest.approx(scipy_frechet(x, y), rel=1e-6)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
  return random_inception_file(tmp_path_factory.mktemp("inception") / fid.WEIGHTS_NAME)


def test_fid_of_a_set_against_itself_is_zero(inception_path, rng):
  net = fid.load_fid_inception(inception_path)
  images = torch.from_numpy(rng.random((2, 3, 48, 64), dtype=np.float32))
  with torch.no_grad():
    feats = fid.fid_features(net, images)
  assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and feats.std() > 0
  scale = float(torch.var(feats, 0).sum())  # trace of the covariance: the size FID values take here
  assert abs(fid.frechet_distance(feats, feats)) < 1e-6 * scale
  assert fid.frechet_distance(feats, feats.flip(1)) > 1e-2 * scale
  # the [0, 1] -> uint8 step truncates: 0.999 and 0.996 are both 254
  assert torch.equal(net((torch.full((1, 3, 8, 8), 0.999) * 255).byte()), fid.fid_features(net, torch.full(
      (1, 3, 8, 8), 254.9 / 255)))


def test_fid_weights_file_must_match(tmp_path):
  path = tmp_path / "bad.pth"
  torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
  with pytest.raises(ValueError, match="FID Inception"):
    fid.load_fid_inception(path)


# ----------------------------------------------------------------------------------------------- PSNR
def _example(gt01, pred01, k=1):
  h, w = gt01.shape[1:]
  return inpainting.Example("s", [f"mask_{i}" for i in range(k)], ["c"] * k, gt01 * 2 - 1, gt01, pred01 * 2 - 1,
                            pred01, torch.ones(k, h, w, dtype=torch.bool))


def test_psnr_is_one_pooled_mse_over_the_set():
  gt = torch.zeros(3, 8, 8)
  a = _example(gt, torch.full((3, 8, 8), 0.1))  # MSE 0.01 -> 20 dB alone
  b = _example(gt, torch.full((3, 8, 8), 0.3), k=2)  # MSE 0.09 -> 10.46 dB alone
  c = _example(torch.ones(3, 8, 8), torch.full((3, 8, 8), 1.5), k=2)  # clamped to 1: no error
  entries = [dict(r, num_masks=len(e.masks)) for e, r in
             zip((a, b, c), inpainting.compute_batch([a, b, c], ["psnr"], inpainting.Models({}, "cpu")))]
  res = inpainting.summarize(dict(zip("abc", entries)), ["psnr"])
  assert res["all"]["psnr"] == pytest.approx(10 * np.log10(1 / ((0.01 + 0.09 + 0) / 3)), abs=1e-5)
  assert res["multi"]["psnr"] == pytest.approx(10 * np.log10(1 / 0.045), abs=1e-5)
  assert res["by_num_masks"]["1"]["psnr"] == pytest.approx(20.0, abs=1e-5)
  assert res["by_num_masks"]["3"] == {"num_images": 0, "num_masks": 0}
  # torchmetrics' own metric, updated image by image, gives the same pooled number
  from torchmetrics.image import PeakSignalNoiseRatio
  tm = PeakSignalNoiseRatio(data_range=(0, 1))
  for e in (a, b, c):
    tm.update(e.pred01[None], e.gt01[None])
  assert res["all"]["psnr"] == pytest.approx(float(tm.compute()), abs=1e-4)


# ----------------------------------------------------------------------------------------------- LPIPS
def test_lpips_loads_torchvision_layout_and_behaves(tmp_path, rng):
  backbone, lin = random_lpips_files(tmp_path)
  net = lpips.load_lpips(backbone, lin)
  assert tuple(net.features[12].expand3x3.weight.shape) == (256, 64, 3, 3)  # torchvision's features.12
  x = torch.from_numpy(rng.random((2, 3, 64, 64), dtype=np.float32)) * 2 - 1
  y = torch.from_numpy(rng.random((2, 3, 64, 64), dtype=np.float32)) * 2 - 1
  with torch.no_grad():
    d_xy, d_yx, d_xx = net(x, y), net(y, x), net(x, x)
  assert d_xy.shape == (2,) and torch.all(d_xy > 0)
  torch.testing.assert_close(d_xy, d_yx)
  assert torch.all(d_xx == 0)
  # the per-layer formula written out for one image: normalise over channels, weight, average, sum
  taps1, taps2 = net.taps(x[:1]), net.taps(y[:1])
  want = sum((conv.weight[0, :, 0, 0][:, None, None] * (f1[0] / torch.sqrt(1e-8 + (f1[0] ** 2).sum(0))
                                                        - f2[0] / torch.sqrt(1e-8 + (f2[0] ** 2).sum(0))) ** 2
              ).sum(0).mean() for conv, f1, f2 in zip(net.lins, taps1, taps2))
  assert float(d_xy[0]) == pytest.approx(float(want), rel=1e-4)


# ----------------------------------------------------------------------------------------------- CLIP-IQA
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip-vit-base-patch32")


def test_clip_iqa_anchors_scores_and_fp16_weights(tmp_path, clip_folder, rng):
  from transformers import CLIPTokenizer
  path = tiny_clip_resnet_file(tmp_path / "RN50.pt")
  tok = CLIPTokenizer.from_pretrained(clip_folder)
  iqa = clip_iqa.load_clip_iqa(path, tok)
  # "Good photo." / "Bad photo." with BOS/EOS, zero-padded to 77 (torchmetrics' anchors)
  want_ids = [[49406, tok.convert_tokens_to_ids(w), tok.convert_tokens_to_ids("photo</w>"),
               tok.convert_tokens_to_ids(".</w>"), 49407] for w in ("good</w>", "bad</w>")]
  assert iqa.anchor_ids[:, :5].tolist() == want_ids and not iqa.anchor_ids[:, 5:].any()
  # conv/linear weights went through fp16 like piq's loader; BatchNorm did not
  w = iqa.model.visual.conv1.weight
  assert torch.equal(w, w.half().float())
  raw = torch.load(path, weights_only=True)
  assert not torch.equal(raw["visual.conv1.weight"], w) and torch.equal(raw["visual.bn1.weight"],
                                                                         iqa.model.visual.bn1.weight)
  images = torch.from_numpy(rng.random((2, 3, 96, 64), dtype=np.float32))  # any size: no positional embedding
  with torch.no_grad():
    scores = iqa(images)
    iqa.model.visual.attnpool.positional_embedding.normal_()
    assert torch.equal(iqa(images), scores)
    # the formula with features and anchors computed independently of ClipIQA.forward
    feats = iqa.model.encode_image((images - iqa.mean) / iqa.std)
    anchors = iqa.model.encode_text(iqa.anchor_ids)
    cos = torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(anchors, dim=-1).T
    want = torch.softmax(100 * cos, -1)[:, 0]
  assert scores.shape == (2,) and torch.all((scores > 0) & (scores < 1))
  torch.testing.assert_close(scores, want)


# ----------------------------------------------------------------------------------------------- CLIPSim
def test_clipsim_matches_direct_transformers_computation(clip_folder, rng):
  from transformers import CLIPModel, CLIPTokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  scorer = clipsim.ClipScorer(clip_folder)
  images = [Image.fromarray(rng.integers(0, 256, size=s + (3,), dtype=np.uint8)) for s in ((300, 200), (64, 512))]
  texts = ["a red apple on a plate", "an image of a cat"]
  got_t2i = scorer.cosine(scorer.text_embeds(texts), scorer.image_embeds(images))

  model = CLIPModel.from_pretrained(clip_folder).eval()
  pixels = CLIPImageProcessorPil()(images=images, size=(224, 224), return_tensors="pt")["pixel_values"]
  enc = CLIPTokenizer.from_pretrained(clip_folder)(texts, padding=True, truncation=True, return_tensors="pt")
  with torch.no_grad():
    img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(**enc)
  img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 returns an output object
  want = torch.nn.functional.cosine_similarity(img, txt).tolist()
  np.testing.assert_allclose(got_t2i, want, rtol=1e-5, atol=1e-6)


def test_masked_views_dim_blur_and_paste_back(rng):
  img = torch.from_numpy(rng.random((3, 40, 50), dtype=np.float32))
  masks = torch.zeros(2, 40, 50)
  masks[0, 5:20, 10:30] = 1
  masks[1, 30:, :7] = 0.5  # any value > 0 is foreground
  views = [np.asarray(v) for v in clipsim.masked_views(img, masks)]
  # independent blur: scipy correlation with the sampled 15x15 Gaussian (sigma 20), mirror (= torch reflect) edges
  t = np.linspace(-7, 7, 15)
  k = np.exp(-0.5 * (t / 20) ** 2)
  k2 = np.outer(k / k.sum(), k / k.sum())
  blurred = np.stack([scipy.ndimage.correlate(0.1 * img[c].double().numpy(), k2, mode="mirror") for c in range(3)])
  for view, m in zip(views, masks):
    want = np.where(m.numpy()[None] > 0, img.numpy(), blurred).transpose(1, 2, 0)
    assert view.dtype == np.uint8
    assert np.abs(view.astype(np.int32) - np.floor(want * 255)).max() <= 1  # truncation, float rounding aside
    inside = m.numpy() > 0
    np.testing.assert_array_equal(view[inside], (img.permute(1, 2, 0) * 255).byte().numpy()[inside])
