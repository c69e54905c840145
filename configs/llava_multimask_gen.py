"""The prompts of SD-2-Inp-RCA-FineTuned-Gen (the original's `generate-prompts`, SPEC §6): llava-v1.6-vicuna-7b-hf +
the MultiMask LoRA adapter on the inpainting test crops (InpaintingSource: 512 px, same seed, shuffle and
threshold as the inpainting run, so the same masks in the same order), colours reversed over the masks (the last
is red), stop at </red>; each mask's prompt is the first <c>...</c> of the answer, case kept, "" when missing.
Writes prompts/<stem>.json (a list in mask order) for the inpainting run, and predictions/ for eval.prompts:

  python -m idmp_jax.main --config=configs/llava_multimask_gen.py --workdir=out/gen_prompts \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.adapter=models/llava/multimask \\
      --config.data_dir=data/mm_inp_dataset
  python -m idmp_jax.main --config=configs/sd2_inp_rca_finetuned_gen.py --config.prompts_dir=out/gen_prompts/prompts \\
      --config.lora=... --config.model_dir=... --config.data_dir=data/mm_inp_dataset

seed, resolution, max_concepts, masked_area_threshold and selection must equal the inpainting run's (the
defaults are the same: 42, 512, 5, 0.65, none).
`--config=configs/llava_multimask_gen.py:demo`: the tiny random model (no adapter) on the demo dataset.
"""
from idmp_jax.tasks import promptgen_generate


def get_config(arg=None):
  c = promptgen_generate.default_config()
  c.name = "llava_multimask_gen"
  c.examples = "inpainting"
  c.require_adapter = True  # --config.adapter=<the MultiMask LoRA folder>
  return promptgen_generate.demo(c) if arg == "demo" else c
