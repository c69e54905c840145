"""LLaVA-1Mask (SPEC §8/§9): llava-v1.6-vicuna-7b-hf + the 1Mask LoRA adapter (`promptgen_train` on gray-mode
examples); the red region of the test example painted gray, asked as "gray", stop at </gray>; the prediction is
the text between the first <gray> and </gray> of the lower-cased answer.

  python -m idmp_jax.main --config=configs/llava_1mask.py --workdir=out/llava_1mask \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.adapter=models/llava/1mask \\
      --config.data_dir=data/mm_inp_dataset
  python -m eval.prompts --predictions out/llava_1mask/predictions --dataset data/mm_inp_dataset \\
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-1Mask --out out/llava_1mask/eval

`--config=configs/llava_1mask.py:demo`: the tiny random model (no adapter) on the demo dataset.
"""
from idmp_jax.tasks import promptgen_generate


def get_config(arg=None):
  c = promptgen_generate.default_config()
  c.name = "llava_1mask"
  c.only_gray_concept = True
  c.require_adapter = True  # --config.adapter=<the 1Mask LoRA folder>
  return promptgen_generate.demo(c) if arg == "demo" else c
