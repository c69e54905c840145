"""The tiny demo: runs on one CPU core in a minute, no downloads.

For now it runs a tiny random RCA UNet forward (task unet_forward); later issues make it paint.
`python -m idmp_jax.main --config=configs/demo.py [--config.batch_size=4] [--config.unet.pretrained=DIR]`
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "demo"
  c.task = "unet_forward"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dtype = "float32"          # Compute dtype: "float32" | "bfloat16" (params stay fp32).
  c.attention = "auto"         # "auto" (cuDNN on GPU in half precision, else XLA) | "xla" | "cudnn".
  c.batch_size = 8
  c.resolution = 64            # Pixels; latents are resolution / 8.
  c.max_concepts = 5
  c.num_masks = 3              # Masks per demo example (RCA regions = num_masks + background).
  c.unet = ml_collections.ConfigDict()
  c.unet.pretrained = ""       # A diffusers unet/ folder; empty: the tiny random UNet below.
  c.unet.tiny = ml_collections.ConfigDict(dict(
      in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
      cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      sample_size=8))
  return c
