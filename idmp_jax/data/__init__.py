"""Datasets of idmp_jax: the on-disk layout, the inpainting and LLaVA examples, and Grain loaders.

Example code needs only NumPy and PIL (no Flax, no torch), so Grain worker processes start fast.
"""
from idmp_jax.data.arrayrecord import (ArrayRecordInpaintingSource, data_source_path,
                                      make_inpainting_source)
from idmp_jax.data.files import BadExampleError, Layout, list_split, validate_dataset, validate_example
from idmp_jax.data.inpainting import (InpaintingConfig, InpaintingSource, example_rng, load_selection_manifest,
                                      make_inpainting_example, pack_prompts, selection_of)
from idmp_jax.data.llava import LlavaConfig, LlavaSource, make_llava_example
from idmp_jax.data.loader import (collate, make_loader, restore_iterator_state, save_iterator_state,
                                  skipped_count, steps_per_epoch)
from idmp_jax.data.tokenizer import ClipTokenizer, load_clip_tokenizer
