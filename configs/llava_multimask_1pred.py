"""LLaVA-MultiMask-1Pred (SPEC §8.5/§9): llava-v1.6-vicuna-7b-hf + the MultiMask LoRA adapter on gray-mode examples
with `override_gray`: only the red region is painted (still red), the question asks for "gray", the answer is read
between <gray> and </gray>, stop at </gray>.

  python -m idmp_jax.main --config=configs/llava_multimask_1pred.py --workdir=out/llava_multimask_1pred \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.adapter=models/llava/multimask \\
      --config.data_dir=data/mm_inp_dataset
  python -m eval.prompts --predictions out/llava_multimask_1pred/predictions --dataset data/mm_inp_dataset \\
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-MultiMask-1Pred --out out/llava_multimask_1pred/eval

`--config=configs/llava_multimask_1pred.py:demo`: the tiny random model (no adapter) on the demo dataset.
"""
from idmp_jax.tasks import promptgen_generate


def get_config(arg=None):
  c = promptgen_generate.default_config()
  c.name = "llava_multimask_1pred"
  c.only_gray_concept = True
  c.override_gray = True
  c.require_adapter = True  # --config.adapter=<the MultiMask LoRA folder>
  return promptgen_generate.demo(c) if arg == "demo" else c
