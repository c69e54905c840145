"""The web app: `python -m idmp_jax.main --config=configs/app.py`, then open http://127.0.0.1:7860/.

Default models: a tiny random pipeline and a tiny random LLaVA-NeXT built in the workdir (no downloads; the
paintings are noise and the prompts random text). Real ones: `--config.model_dir=.../stable-diffusion-2-inpainting
--config.llava_dir=.../llava-v1.6-vicuna-7b-hf --config.llava_adapter=DIR` (the MultiMask adapter, promptgen_train's
export/adapter).
`configs/app.py:cpu`: small settings for a CPU (64 px, 10 steps, fp32)."""
from idmp_jax.tasks import paint_app


def get_config(arg=None):
  c = paint_app.default_config()
  if arg == "cpu":  # Small and fast on a CPU.
    c.dtype, c.resolution, c.num_inference_steps, c.prompt_max_new_tokens = "float32", 64, 10, 24
  return c
