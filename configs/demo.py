"""The tiny demo: runs on a CPU in minutes, no downloads.

`python -m idmp_jax.main --config=configs/demo.py` paints the demo dataset's test split (real photographs shipped by
scikit-image, built into the workdir) with a tiny random SD-2-inpainting-shaped pipeline (built into the workdir),
RCA on, and writes PNGs + manifest.json under workdir/demo/. The paintings are noise: the weights are random.
`configs/demo.py:unet` runs only a tiny random RCA UNet forward (RCA on and off).
"""
import ml_collections

from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  if arg == "unet":
    return unet_forward_config()
  c = inpaint_sample.default_config()
  c.name = "demo"
  c.model_dir = "tiny"
  c.data_dir = "demo"
  c.dtype = "float32"
  c.resolution = 64          # The tiny VAE's 8x downscale gives 8x8 latents.
  c.batch_size = 4
  c.num_inference_steps = 10
  return c


def unet_forward_config():
  c = ml_collections.ConfigDict()
  c.name = "demo_unet"
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
  from idmp_jax.tiny import TINY_UNET
  c.unet.tiny = ml_collections.ConfigDict(TINY_UNET)
  return c
