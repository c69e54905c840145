"""Paint one picture: `--config.image=PATH --config.masks=M1.png,M2.png` (the prompt generator writes one prompt per
mask; `--config.prompts='a|b'` gives them by hand), or `--config.stem=NAME --config.data_dir=...`. Default models:
a tiny random pipeline and a tiny random LLaVA-NeXT (noise and random text, but no downloads); real ones:
`--config.model_dir=.../stable-diffusion-2-inpainting --config.llava_dir=.../llava-v1.6-vicuna-7b-hf
--config.llava_adapter=DIR` (the MultiMask adapter, promptgen_train's export/adapter).
`configs/paint.py:cpu`: small settings for a CPU (64 px, 10 steps, fp32)."""
from idmp_jax.tasks import paint


def get_config(arg=None):
  c = paint.default_config()
  if arg == "cpu":  # Small and fast on a CPU.
    c.dtype, c.resolution, c.num_inference_steps, c.prompt_max_new_tokens = "float32", 64, 10, 24
  return c
