"""promptgen_train (LoRA fine-tuning of LLaVA-NeXT) on the tiny random model and the demo dataset: the answer-only
loss against transformers' labels=-100 loss, peft adapter folders in both directions (and generation with an
adapter against transformers + peft), the int8 transform, and the job end to end: a restart resumes with the
same losses, and 8 devices (fsdp = 8) give the losses of 1."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax import parallel
from idmp_jax.data.llava import LlavaConfig, LlavaSource
from idmp_jax.models import lora, quantize
from idmp_jax.models import llava_next as ln
from idmp_jax.tasks import promptgen_generate as pg
from idmp_jax.tasks import promptgen_train as pt
from idmp_jax.tiny_llava import make_tiny_llava
from idmp_jax.train import metrics, promptgen
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The tiny LLaVA folder and a demo dataset with 16 train images (4 x 4 copies): 2 steps per epoch at batch 8."""
  from data_prep.demo import make_demo_dataset
  root = tmp_path_factory.mktemp("ptrain")
  return {"model_dir": make_tiny_llava(str(root / "tiny_llava")),
          "data_dir": make_demo_dataset(str(root / "demo"), copies=4)}


@pytest.fixture(scope="module")
def torch_model(prepared):
  return transformers.LlavaNextForConditionalGeneration.from_pretrained(prepared["model_dir"]).eval()


def _batch(prepared, config, rows=(0, 4)):
  """Encoded train examples `rows` (0 and 4: two different photographs) as a batch, the examples, the encoder."""
  source = LlavaSource(prepared["data_dir"], LlavaConfig(split="train"), seed=42)
  encoder = promptgen.ExampleEncoder(prepared["model_dir"], config, max_length=256,
                                     seq_len=promptgen.default_seq_len(config, 256))
  examples = [source.example(i) for i in rows]
  encoded = [dict(encoder(e), valid=np.float32(1)) for e in examples]
  return {k: np.stack([r[k] for r in encoded]) for k in promptgen.BATCH_KEYS}, examples, encoder



def _random_adapter(params, seed=0):
  """LoRA on the language model with non-zero B (a fresh adapter is an exact no-op: nothing to compare)."""
  lm = lora.init_lora(params["language_model"], jax.random.key(seed), 4, 8.0, ln.LORA_TARGETS, "gaussian")
  rng = np.random.default_rng(seed)
  lm = jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(0, 0.3, x.shape).astype(np.float32) if p[-1].key == "lora_b" else x, lm)
  return dict(params, language_model=lm)


_FORWARD = {}


def _our_logits(config, params, batch):
  """Full logits through `embed_rows` (the training path), one jitted function per config (shared by tests)."""
  if config not in _FORWARD:
    model = ln.LlavaNextForConditionalGeneration(config)
    full = lambda m, ids, pix, idx, mask: m.language_model.logits(
        m.language_model.model(inputs_embeds=m.embed_rows(ids, pix, idx), attention_mask=mask)[0])
    _FORWARD[config] = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["pixel_values"],
                                                        b["row_feature_index"], b["attention_mask"], method=full))
  return np.asarray(_FORWARD[config](params, {k: batch[k] for k in promptgen.BATCH_KEYS}))


def _torch_inputs(batch, examples, encoder):
  from idmp_jax.data import llava_processor as lp
  sizes = lp.preprocess([e["image"] for e in examples], encoder.proc_config)["image_sizes"]
  return dict(input_ids=torch.tensor(batch["input_ids"]).long(), attention_mask=torch.tensor(batch["attention_mask"]),
              pixel_values=torch.tensor(np.asarray(batch["pixel_values"], np.float32)),
              image_sizes=torch.tensor(sizes))


# ----------------------------------------------------------------------------------------------------------------
# The loss.


def test_answer_only_loss_matches_transformers_labels(prepared, torch_model, tmp_path):
  """Our windowed token-mean equals transformers' loss with labels = -100 except the answer tokens; the trained
  tokens decode to exactly " " + target; a valid = 0 row drops out of the mean."""
  config, params = ln.load_pretrained(prepared["model_dir"])
  params = _random_adapter(params)
  batch, examples, encoder = _batch(prepared, config)
  labels = promptgen.reference_labels(batch)
  for row, ex in zip(labels, examples):
    assert encoder.tokenizer.decode(row[row != -100]) == ex["target"]  # The answer, nothing of the question.
  assert len(set(batch["answer_length"].tolist())) > 1  # A token mean, not a mean of row means.
  trainable, frozen = lora.split(params)
  model = ln.LlavaNextForConditionalGeneration(config)
  loss = jax.jit(lambda t, f, b: promptgen.loss_fn(t, f, b, jax.random.key(0), model=model, answer_window=255,
                                                   train=False))
  ours, counts = loss(trainable, frozen, batch)
  assert float(counts["answer_tokens"]) == float((labels != -100).sum())

  ln.save_peft_adapter(str(tmp_path / "adapter"), params)
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    inputs = _torch_inputs(batch, examples, encoder)
    ref = peft_model(**inputs, labels=torch.tensor(labels).long()).loss.item()
    ref0 = peft_model(**{k: v[:1] for k, v in inputs.items()}, labels=torch.tensor(labels[:1]).long()).loss.item()
  peft_model.unload()
  assert abs(float(ours) - ref) <= 1e-5 * abs(ref)
  one_row, _ = loss(trainable, frozen, dict(batch, valid=np.float32([1, 0])))
  assert abs(float(one_row) - ref0) <= 1e-5 * abs(ref0) and abs(ref0 - ref) > 1e-6




# ----------------------------------------------------------------------------------------------------------------
# peft folders.


def test_peft_adapter_both_directions(prepared, torch_model, tmp_path):
  """Ours -> peft and peft -> ours give the same logits as the other side (fp32, <= 1e-4), merged or not; the
  regex targets exactly the original's set (every Linear of the language model but lm_head)."""
  config, base = ln.load_pretrained(prepared["model_dir"])
  batch, examples, encoder = _batch(prepared, config)
  inputs = _torch_inputs(batch, examples, encoder)
  real = batch["attention_mask"].astype(bool)
  base_logits = _our_logits(config, base, batch)

  # The original's target list (find_all_linear_names): the same modules, the same number of weights.
  names = [n for n, m in torch_model.named_modules()
           if isinstance(m, torch.nn.Linear) and "language_model" in n and "lm_head" not in n]
  counted = peft.get_peft_model(transformers.LlavaNextForConditionalGeneration.from_pretrained(
      prepared["model_dir"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
  by_regex = peft.get_peft_model(transformers.LlavaNextForConditionalGeneration.from_pretrained(
      prepared["model_dir"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ln.lora_target_regex()))
  assert sorted(counted.targeted_module_names) == sorted(by_regex.targeted_module_names) == sorted(names)
  ours = _random_adapter(base)
  assert lora.count(ours) == sum(p.numel() for n, p in counted.named_parameters() if "lora_" in n)

  # Ours -> peft.
  folder = str(tmp_path / "ours")
  ln.save_peft_adapter(folder, ours)
  logits = _our_logits(config, ours, batch)
  assert rel_err(logits[real], base_logits[real]) > 1e-2  # The adapter matters.
  loaded = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  with torch.no_grad():
    ref = loaded(**inputs).logits.numpy()
  loaded.unload()
  assert rel_err(logits[real], ref[real]) <= 1e-4

  # peft -> ours (peft writes transformers 5's module names).
  rng = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for n, p in by_regex.named_parameters():
      if "lora_B" in n:
        p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    ref = by_regex.eval()(**inputs).logits.numpy()
  by_regex.save_pretrained(str(tmp_path / "peft"))
  attached = ln.load_peft_adapter(str(tmp_path / "peft"), base)
  assert lora.count(attached) == lora.count(ours)
  assert rel_err(_our_logits(config, attached, batch)[real], ref[real]) <= 1e-4
  assert rel_err(_our_logits(config, lora.merge_lora(attached), batch)[real], ref[real]) <= 1e-4

  # Refusals name the file and the field.
  cfg_path = tmp_path / "peft" / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps(dict(cfg, use_dora=True)))
  with pytest.raises(Exception, match="adapter_config.json.*use_dora"):
    ln.load_peft_adapter(str(tmp_path / "peft"), base)


def test_generate_with_adapter_matches_transformers_peft(prepared, torch_model, tmp_path):
  """promptgen_generate with config.adapter (merged at load) writes the answer transformers + peft generate
  greedily on the same question and image."""
  config, base = ln.load_pretrained(prepared["model_dir"])
  folder = str(tmp_path / "adapter")
  ln.save_peft_adapter(folder, _random_adapter(base, seed=3))
  c = pg.default_config()
  c.update(dict(model_dir=prepared["model_dir"], data_dir=prepared["data_dir"], adapter=folder, dtype="float32",
                batch_size=1, max_images=1, max_new_tokens=8, chunk_size=4, length_bucket=64, devices=1,
                stop_string="</never>"))
  workdir = str(tmp_path / "gen")
  pg.run(c, workdir, parallel.make_mesh(c))
  source = LlavaSource(prepared["data_dir"], LlavaConfig(split="test"), seed=c.seed)
  example = source.example(0)
  answer = json.load(open(os.path.join(workdir, "generations", f"{example['stem']}.json")))["answer"]

  from idmp_jax.data import llava_processor as lp
  tok = pg.LlavaTokenizer(prepared["model_dir"])
  proc = lp.preprocess([example["image"]], lp.ImageProcessorConfig.load(prepared["model_dir"]))
  ids = lp.expand_image_tokens(tok.encode(example["question"]), proc["image_sizes"], config)
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  with torch.no_grad():
    out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pixel_values=torch.tensor(proc["pixel_values"]),
                              image_sizes=torch.tensor(proc["image_sizes"]), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_id)
  peft_model.unload()
  new = out[0, len(ids):].tolist()
  assert answer == tok.decode(new) and len(new) > 0


# ----------------------------------------------------------------------------------------------------------------
# int8.


def test_int8_weights_dequantised_in_the_matmul(prepared):
  config, params = ln.load_pretrained(prepared["model_dir"])
  batch, _, _ = _batch(prepared, config, rows=(0,))
  q = quantize.quantize_int8(params, lambda p: p[0] == "language_model" and "layers" in "/".join(p))
  kernel = q["language_model"]["model"]["layers_0"]["mlp"]["down_proj"]
  assert kernel["kernel"].dtype == np.int8 and kernel["kernel_scale"].shape == (config.text_config.hidden_size,)
  w = params["language_model"]["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert kernel["kernel"].shape == w.shape[::-1]  # Stored (out, in): the contraction axis contiguous.
  assert np.all(np.abs(quantize.dequantize_kernel(kernel["kernel"], kernel["kernel_scale"]) - w)
                <= kernel["kernel_scale"] / 2 + 1e-7)
  real = batch["attention_mask"].astype(bool)
  deq = _our_logits(config, quantize.dequantize(q), batch)
  assert rel_err(_our_logits(config, q, batch)[real], deq[real]) <= 1e-5  # (x @ q) * s == x @ (q * s)
  assert 1e-6 < rel_err(deq[real], _our_logits(config, params, batch)[real]) <= 2e-2


def test_int4_grouped_weights_dequantised_in_the_matmul(prepared):
  """int4 with one scale per 16 input rows of each column: every weight within half a step of its group's grid,
  the model's grouped matmul equal to the dequantised model's, and the 4-bit loss bounded."""
  config, params = ln.load_pretrained(prepared["model_dir"])
  batch, _, _ = _batch(prepared, config, rows=(0,))
  is_decoder = lambda p: p[0] == "language_model" and "layers" in "/".join(p)
  q = quantize.quantize_int4(params, is_decoder, group_size=16)
  kernel = q["language_model"]["model"]["layers_0"]["mlp"]["down_proj"]
  tc = config.text_config
  assert kernel["kernel"].dtype == jnp.int4 and kernel["kernel_scale"].shape == (tc.intermediate_size // 16,
                                                                                 tc.hidden_size)
  assert np.abs(kernel["kernel"].astype(np.int32)).max() == 7
  w = params["language_model"]["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
  step = np.repeat(kernel["kernel_scale"], 16, axis=0)
  assert np.all(np.abs(quantize.dequantize_kernel(kernel["kernel"], kernel["kernel_scale"]) - w) <= step / 2 + 1e-7)
  real = batch["attention_mask"].astype(bool)
  deq = _our_logits(config, quantize.dequantize(q), batch)
  assert rel_err(_our_logits(config, q, batch)[real], deq[real]) <= 1e-5
  assert 1e-4 < rel_err(deq[real], _our_logits(config, params, batch)[real]) <= 0.3
  with pytest.raises(ValueError, match="not divisible"):
    quantize.quantize_int4(params, is_decoder, group_size=7)
  with pytest.raises(ValueError, match="group_size"):
    quantize.quantize_int4(params, is_decoder, group_size=0)


@pytest.mark.parametrize("lead", [(1,), (2, 3), (40,)])
def test_int4_matmul_both_forms_equal_the_dequantised_kernel(lead):
  """quantize.matmul's two grouped forms: a dot per group with scaled partial sums (few rows: 1 and 2x3 rows of 4
  groups of 16) and the scaled kernel (40 rows), each equal to x @ the dequantised kernel."""
  r = np.random.default_rng(len(lead))
  q, s = quantize.quantize_kernel(r.standard_normal((64, 24)).astype(np.float32), bits=4, group_size=16)
  x = jnp.asarray(r.standard_normal((*lead, 64)), jnp.float32)
  want = x @ quantize.dequantize_kernel(jnp.asarray(q), jnp.asarray(s))
  assert rel_err(quantize.matmul(x, jnp.asarray(q), jnp.asarray(s), jnp.float32), want) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# The job.


def _config(prepared, **overrides):
  c = pt.demo(pt.default_config())
  c.update(dict(model_dir=prepared["model_dir"], data_dir=prepared["data_dir"], batch_size=8, num_epochs=2,
                progress_bar=False, keep_checkpoints=10))
  c.update(overrides)
  return c


def _losses(workdir):
  return {s: r["loss"] for s, r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")).items() if "loss" in r}


def test_eight_devices_equal_one_and_restart_resumes(prepared, tmp_path):
  """The run on 1 device is the reference for the same run on 8 (fsdp = 8: base, LoRA weights and Adam moments
  sharded), stopped after step 1 (mid-epoch: the data iterator is saved at batch 1) and started again with the
  same command: it resumes at step 2 from the sharded checkpoint and gives the reference's losses."""
  one = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ref, eight = str(tmp_path / "ref"), str(tmp_path / "eight")
  assert pt.run(_config(prepared), ref, one)["step"] == 4
  config = _config(prepared, mesh={"data": 1, "fsdp": -1, "tensor": 1})
  mesh = parallel.make_mesh(config)
  assert mesh.shape["fsdp"] == 8
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))  # The restart compiles nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    assert pt.run(_config(prepared, mesh=config.mesh, max_steps=1), eight, mesh)["step"] == 1
    assert pt.run(config, eight, mesh)["step"] == 4
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)

  with open(os.path.join(eight, "metrics.jsonl")) as f:  # Resumed at step 2, not trained again from 1.
    assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3, 4]
  a, b = _losses(ref), _losses(eight)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert len(set(np.round(list(a.values()), 7))) == 4  # Different batches, different losses.
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)

  # The exported adapters agree, and the trained one differs from a fresh adapter (B = 0).
  from safetensors.numpy import load_file
  x, y = (load_file(os.path.join(d, "export", "adapter", "adapter_model.safetensors")) for d in (ref, eight))
  assert x.keys() == y.keys() and all(np.allclose(x[k], y[k], rtol=1e-4, atol=1e-7) for k in x)
  assert all(np.abs(v).max() > 0 for k, v in x.items() if "lora_B" in k)
  assert os.path.isdir(os.path.join(ref, "adapter", "epoch_1"))

  # With fsdp = 8 the job's rules shard the base and every LoRA weight and Adam moment of its train state.
  from idmp_jax.train import optimizer as optim, state as train_state
  _, base = ln.load_pretrained(prepared["model_dir"])
  trainable, frozen = lora.split(_random_adapter(base))
  tx, _ = optim.make_optimizer(config.optimizer, 2, 4)
  rules = [tuple(r) for r in config.sharding_rules]
  state = parallel.param_shardings(jax.eval_shape(lambda p: train_state.init_state(p, tx, jax.random.key(0)),
                                                  trainable), mesh, rules)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  lora_specs = [s.spec for p, s in leaves if "lora_" in jax.tree_util.keystr(p)]
  assert len(lora_specs) == 3 * len(jax.tree.leaves(trainable)) and all("fsdp" in s for s in lora_specs)
  kernels = [s.spec for p, s in jax.tree_util.tree_leaves_with_path(parallel.param_shardings(frozen, mesh, rules))
             if "kernel" in jax.tree_util.keystr(p)]
  assert kernels and all("fsdp" in s for s in kernels)


def test_qlora_int4_trains_and_bad_format_is_named(prepared, tmp_path):
  """quantize="int4" (the original's 4-bit QLoRA, on a uniform grid): the job trains adapters over the int4 base,
  with finite losses close to the float base's; an unknown format is named before anything loads."""
  one = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  runs = {}
  for fmt in ("", "int4"):
    workdir = str(tmp_path / (fmt or "float"))
    assert pt.run(_config(prepared, quantize=fmt, max_steps=2, num_epochs=1), workdir, one)["step"] == 2
    runs[fmt] = _losses(workdir)
  assert sorted(runs["int4"]) == [1, 2] and all(np.isfinite(list(runs["int4"].values())))
  np.testing.assert_allclose([runs["int4"][s] for s in (1, 2)], [runs[""][s] for s in (1, 2)], rtol=0.1)
  assert runs["int4"] != runs[""]  # The base really is quantised.
  with pytest.raises(ValueError, match="config.quantize"):
    pt.run(_config(prepared, quantize="nf4"), str(tmp_path / "bad"), one)
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_warmup_is_one_percent_of_the_run():
  """SPEC §9: lr 2e-4, linear warm-up over 1% of the run's steps (28.84 of the original's 2,884), lr 0 at 0."""
  from idmp_jax.train import optimizer as optim
  for epochs in (1, 2):
    _, schedule = optim.make_optimizer(pt.default_config().optimizer, 2884, epochs * 2884)
    warmup = 28.84 * epochs
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(int(warmup))), 2e-4 * int(warmup) / warmup, rtol=1e-6)
    assert float(schedule(int(warmup) + 1)) == pytest.approx(2e-4, rel=1e-6)
