"""The paper's regional cross-attention stated in PyTorch and patched into a diffusers UNet (test reference)."""
import contextlib

import torch
import torch.nn.functional as F


class RegionalCrossAttnProcessor:
  """softmax(q k^T / sqrt(d) + where(M, 0, -inf)) v with M[p, t] = region_masks[token_region[t]] at p, the
  region masks resized to the feature map by torch nearest (SPEC §3), in fp32."""

  def __init__(self, region_masks, token_region):
    self.region_masks, self.token_region, self.hw = region_masks, token_region, None

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
    b, n, _ = hidden_states.shape
    q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    heads = attn.heads
    split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    h, w = self.hw
    rm = F.interpolate(self.region_masks, size=(h, w), mode="nearest").flatten(2)  # (B, R, hw)
    idx = self.token_region[:, :, None].expand(-1, -1, h * w)  # (B, S, hw)
    allowed = torch.gather(rm, 1, idx).transpose(1, 2) > 0.5  # (B, hw, S)
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]
    logits = q @ k.transpose(-1, -2) * attn.scale + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def patched_rca(model, region_masks, token_region):
  """Within the block, every attn2 of `model` (a diffusers UNet) computes RCA with these masks (NumPy arrays,
  batch = the UNet's batch, so doubled for classifier-free guidance)."""
  from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchT2D
  procs, hooks, original = [], [], dict(model.attn_processors)
  rm, tr = torch.from_numpy(region_masks).float(), torch.from_numpy(token_region).long()
  for module in model.modules():
    if isinstance(module, TorchT2D):
      module_procs = []
      for block in module.transformer_blocks:
        proc = RegionalCrossAttnProcessor(rm, tr)
        block.attn2.set_processor(proc)
        module_procs.append(proc)
      def hook(mod, args, kwargs, module_procs=module_procs):
        for p in module_procs:
          p.hw = tuple(args[0].shape[-2:])
      hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
      procs += module_procs
  try:
    yield
  finally:
    for h in hooks:
      h.remove()
    model.set_attn_processor(original)
