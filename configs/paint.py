"""Paint one picture: `--config.image=PATH --config.masks=M1.png,M2.png --config.prompts='a|b'` (or
`--config.stem=NAME --config.data_dir=...`). Default models: a tiny random pipeline (noise, but no downloads);
`--config.model_dir=.../stable-diffusion-2-inpainting` for real paintings."""
from idmp_jax.tasks import paint


def get_config(arg=None):
  c = paint.default_config()
  if arg == "cpu":  # Small and fast on a CPU.
    c.dtype, c.resolution, c.num_inference_steps = "float32", 64, 10
  return c
