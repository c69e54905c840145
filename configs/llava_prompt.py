"""LLaVA-Prompt (zero-shot, SPEC §8.10/§9): the base llava-v1.6-vicuna-7b-hf without adapter, the red region of the
test example painted gray, the question "Write 1 text prompt that describes a reasonable object to be inserted in
the gray area."; the whole answer (to EOS or 512 tokens; the </gray> stop string is never emitted) is the
prediction for that region.

  python -m idmp_jax.main --config=configs/llava_prompt.py --workdir=out/llava_prompt \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.data_dir=data/mm_inp_dataset
  python -m eval.prompts --predictions out/llava_prompt/predictions --dataset data/mm_inp_dataset \\
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-Prompt --out out/llava_prompt/eval

`--config=configs/llava_prompt.py:demo`: the tiny random model on the demo dataset (CPU, no downloads).
"""
from idmp_jax.tasks import promptgen_generate


def get_config(arg=None):
  c = promptgen_generate.default_config()
  c.name = "llava_prompt"
  c.only_gray_concept = True
  c.question = "zero_shot"
  return promptgen_generate.demo(c) if arg == "demo" else c
