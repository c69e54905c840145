"""The LoRA fine-tuning job (tasks/inpaint_train) on a tiny random pipeline and the demo dataset: optimizer
numerics against torch, 1 device vs 8 (FSDP-sharded weights, ArrayRecord input), kill -9 and resume, the NaN
stop, two processes vs one, bad data/sharding settings.

The end-to-end runs share one persistent compilation cache, so only the first run of each device layout pays
XLA's compile (about a minute on a busy 2-core machine).
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch

from idmp_jax.train import optimizer as optim
from idmp_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH = 3, 2  # 12 train images (demo x 3 copies), global batch 8: 8 + 4 (padded) per epoch
OVERRIDES = dict(batch_size=8, num_epochs=EPOCHS, early_stopping=False, checkpoint_every_steps=1,
                 keep_checkpoints=20, progress_bar=False, export_merged_unet=True, data_workers=0, log_every_steps=1)


def load_config(**overrides):
  spec = importlib.util.spec_from_file_location("rca_config", os.path.join(REPO, "configs", "rca.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo")
  for k, v in {**OVERRIDES, **overrides}.items():
    setattr(config, k, v)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Tiny pipeline, demo dataset (3 copies of the train images) and a compilation cache, built once."""
  from data_prep.demo import make_demo_dataset
  from idmp_jax.tiny import TINY_UNET
  from idmp_jax.train.tiny import write_random_pipeline
  root = tmp_path_factory.mktemp("train")
  # One UNet level (cross-attention down, mid and up blocks): the compile is a third shorter than the demo's two.
  model_dir = write_random_pipeline(str(root / "pipeline"), seed=0, unet_config=dict(
      TINY_UNET, block_out_channels=(32,), attention_head_dim=(2,), down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",)))
  data_dir = make_demo_dataset(str(root / "demo"), copies=3)
  return dict(model_dir=model_dir, data_dir=data_dir, cache=str(root / "jax_cache"))


def command(prepared, workdir, **overrides):
  flags = {**OVERRIDES, "model_dir": prepared["model_dir"], "data_dir": prepared["data_dir"], **overrides}
  return [sys.executable, "-m", "idmp_jax.main", "--config=configs/rca.py:demo", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def launch(prepared, workdir, devices=1, env=None, log=None, **overrides):
  """Starts `python -m idmp_jax.main` on `devices` forced CPU devices; output appended to `log` (workdir.log)."""
  environ = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                 JAX_COMPILATION_CACHE_DIR=prepared["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1", **(env or {}))
  with open(log or workdir + ".log", "ab") as f:
    return subprocess.Popen(command(prepared, workdir, **overrides), cwd=REPO, env=environ, stdout=f,
                            stderr=subprocess.STDOUT)


def output(workdir, log=None):
  with open(log or workdir + ".log", errors="replace") as f:
    return f.read()


def losses(workdir):
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {s: r["loss"] for s, r in rows.items() if "loss" in r}, {s: r["val_loss"] for s, r in rows.items()
                                                                 if "val_loss" in r}


# ------------------------------------------------------------------------------------------------------------
# Optimizer: the original's torch AdamW + clip_grad_norm_ + constant_with_warmup, step for step.


@pytest.mark.parametrize("flatten", [True, False])
def test_optimizer_matches_torch(flatten):
  """Two leaves, so the clip's global norm spans leaves; flattened (configs/rca.py) and per leaf."""
  from diffusers.optimization import get_constant_schedule_with_warmup
  cfg = load_config().optimizer
  cfg.flatten = flatten
  steps_per_epoch = 2884
  tx, schedule = optim.make_optimizer(cfg, steps_per_epoch)
  assert float(schedule(0)) == 0.0  # lr 0 at step 0
  rng = np.random.default_rng(0)
  shapes = {"v": (3, 4), "w": (50,)}  # (Sorted: the pytree's leaf order.)
  ps = {k: torch.nn.Parameter(torch.tensor(rng.standard_normal(s).astype(np.float32))) for k, s in shapes.items()}
  opt = torch.optim.AdamW(list(ps.values()), lr=cfg.lr, betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps,
                          weight_decay=cfg.weight_decay)
  sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=cfg.warmup_fraction_of_epoch * steps_per_epoch)
  params = {k: jax.numpy.asarray(p.detach().numpy()) for k, p in ps.items()}
  state = tx.init(params)
  # Flattened: the moments are one vector over both leaves.
  assert {x.shape for x in jax.tree.leaves(state) if x.ndim} == ({(62,)} if flatten else {(3, 4), (50,)})
  for step in range(40):  # through the end of the 28.84-step warm-up
    g = {k: rng.standard_normal(s).astype(np.float32) * (3.0 if step % 3 else 0.1) for k, s in shapes.items()}
    assert np.isclose(float(schedule(step)), sched.get_last_lr()[0], rtol=1e-6, atol=0)
    for k, p in ps.items():
      p.grad = torch.from_numpy(g[k].copy())
    torch_norm = float(torch.nn.utils.clip_grad_norm_(list(ps.values()), cfg.grad_clip))  # clipped and not
    np.testing.assert_allclose(float(optim.global_norm(g, flatten)), torch_norm, rtol=1e-6)
    opt.step()
    sched.step()
    updates, state = tx.update(jax.tree.map(jax.numpy.asarray, g), state, params)
    params = jax.tree.map(lambda a, u: a + u, params, updates)
    for k, p in ps.items():
      np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=2e-5, atol=1e-7)


def test_flat_state_steps_as_the_tree():
  """The train state with its LoRA leaves as one vector (configs/rca.py) takes the steps the tree form takes:
  same losses, gradient norms, parameters and optimizer state, the NaN guard included; a tree that does not fit
  the layout is refused."""
  import jax.numpy as jnp
  from idmp_jax.train import state as train_state
  tx, schedule = optim.make_optimizer(load_config().optimizer, 4)
  assert optim.flattened(load_config().optimizer)
  rng = np.random.default_rng(0)
  params = {"b": {"lora_a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)},
            "a": {"lora_b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}}

  def loss_fn(trainable, frozen, batch, key):
    h = trainable["b"]["lora_a"] @ frozen + jnp.sum(trainable["a"]["lora_b"]) * batch
    noise = jax.random.normal(key, h.shape)
    return jnp.mean(jnp.square(h - noise)), {"examples": jnp.float32(2)}

  step = jax.jit(train_state.make_train_step(loss_fn, tx, schedule))
  frozen = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
  states = {flat: train_state.init_state(params, tx, jax.random.key(1), flat=flat) for flat in (False, True)}
  assert states[True].params.shape == (17,) and states[True].layout is not None
  for i in range(6):
    batch = jnp.full((3, 2), jnp.nan if i == 3 else float(i), jnp.float32)  # Step 3: a NaN loss, no update.
    metrics = {}
    for flat in (False, True):
      states[flat], metrics[flat] = step(states[flat], frozen, batch)
    for k in ("loss", "grad_norm", "lr"):
      np.testing.assert_allclose(metrics[True][k], metrics[False][k], rtol=1e-6, equal_nan=True)
    for got, want in zip(jax.tree.leaves((states[True].trainable(), states[True].opt_state)),
                         jax.tree.leaves((states[False].params, states[False].opt_state))):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert int(states[True].step) == 6 and bool(jnp.isnan(metrics[True]["loss"])) is False
  with pytest.raises(ValueError, match="FlatLayout.ravel"):
    states[True].layout.ravel({"b": {"lora_a": jnp.zeros((3, 4))}})
  with pytest.raises(ValueError, match="several dtypes"):
    train_state.FlatLayout({"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)})


def test_flat_layout_gradient_is_a_concatenation():
  """The gradient through `FlatLayout.unravel` equals autodiff of plain slicing, and is built as one
  concatenation of the leaves' cotangents rather than a pad of the whole vector per leaf (what autodiff of the
  slices gives, and XLA turned into 256-deep add chains for the UNet's LoRA leaves)."""
  import jax.numpy as jnp
  from idmp_jax.train import state as train_state
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
          "b": [jnp.asarray(rng.standard_normal((5,)), jnp.float32), jnp.asarray(rng.standard_normal((2, 2, 2)),
                                                                                  jnp.float32)]}
  layout = train_state.FlatLayout(tree)
  flat = layout.ravel(tree)
  weights = jnp.asarray(rng.standard_normal(flat.shape), jnp.float32)

  def loss(unravel, v):  # Every leaf used nonlinearly, one leaf twice.
    t = unravel(v)
    return jnp.sum(jnp.sin(t["a"]) * t["a"]) + jnp.sum(t["b"][0] ** 3) + jnp.sum(jnp.cos(t["b"][1]))

  def sliced(v):
    out, start = [], 0
    for shape in layout.shapes:
      out.append(jnp.reshape(v[start:start + int(np.prod(shape))], shape))
      start += int(np.prod(shape))
    return jax.tree.unflatten(layout.treedef, out)

  got = jax.grad(lambda v: loss(layout.unravel, v))(flat * weights)
  want = jax.grad(lambda v: loss(sliced, v))(flat * weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: loss(layout.unravel, v)))(flat))
  assert "concatenate" in jaxpr and " pad[" not in jaxpr
  assert " pad[" in str(jax.make_jaxpr(jax.grad(lambda v: loss(sliced, v)))(flat))  # The check can fail.


# ------------------------------------------------------------------------------------------------------------
# The job end to end.


def test_devices_kill_resume_nan_export(prepared, tmp_path):
  """One uninterrupted run on 1 device (subprocess, replicated weights, the dataset folder) is the reference for:
  the same run on 8 devices with FSDP-sharded weights reading the ArrayRecord build of the dataset (in-process),
  a run killed with SIGKILL mid-way and restarted, and a NaN that stops a resumed run."""
  from data_prep import tfds_builder
  from idmp_jax import parallel
  from idmp_jax.tasks import inpaint_train
  ref_dir, k_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  reference = launch(prepared, ref_dir)

  # 8 devices, in this process, while the reference compiles: batch and weights over fsdp=8 (the "fsdp" preset,
  # every kernel here: the tiny model's are all under the default fsdp_min_size), examples from the ArrayRecord
  # build (data_dir is not read). The data axis over several devices is test_two_processes_equal_one's.
  build = tfds_builder.build_tfds(prepared["data_dir"], str(tmp_path / "tfds"), progress=False)["build_dir"]
  config = load_config(model_dir=prepared["model_dir"], data_dir=str(tmp_path / "not_read"),
                       data_format="array_record", array_record_dir=build, sharding_rules="fsdp", fsdp_min_size=0)
  config.mesh.data, config.mesh.fsdp = 1, 8
  summary = inpaint_train.run(config, str(tmp_path / "eight"), parallel.make_mesh(config))
  assert summary["step"] == EPOCHS * STEPS_PER_EPOCH and len(summary["val_losses"]) == EPOCHS
  assert summary["frozen_arrays_sharded"] > summary["frozen_arrays"] // 4  # kernels split; norms, biases not
  assert reference.wait(timeout=400) == 0, output(ref_dir)[-3000:]
  ref_train, ref_val = losses(ref_dir)
  assert sorted(ref_train) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)) and sorted(ref_val) == [2, 4, 6]
  assert len(set(np.round(list(ref_train.values()), 6))) == len(ref_train)  # It trains: every loss differs.
  eight_train, eight_val = losses(str(tmp_path / "eight"))
  np.testing.assert_allclose([eight_train[s] for s in sorted(ref_train)], [ref_train[s] for s in sorted(ref_train)],
                             rtol=2e-5)
  np.testing.assert_allclose([eight_val[s] for s in sorted(ref_val)], [ref_val[s] for s in sorted(ref_val)],
                             rtol=2e-5)

  # A NaN, started now beside the kill test: one more epoch on a copy of the reference run with a poisoned UNet
  # weight. It stops at step 7 naming the batch; checkpoint 6 (the last good one) is untouched and nothing is
  # written for step 7.
  nan_dir, poisoned = str(tmp_path / "nan"), str(tmp_path / "poisoned")
  shutil.copytree(ref_dir, nan_dir)
  shutil.copytree(prepared["model_dir"], poisoned)
  from idmp_jax.models import unet
  cfg, params = unet.load_pretrained(os.path.join(poisoned, "unet"))
  params["conv_out"]["bias"] = params["conv_out"]["bias"] * np.nan
  unet.save_pretrained(os.path.join(poisoned, "unet"), cfg, params)
  ckpts = os.path.join(nan_dir, "checkpoints")
  mtimes = lambda: {f: os.path.getmtime(os.path.join(ckpts, "6", f)) for f in os.listdir(os.path.join(ckpts, "6"))}
  before = mtimes()
  nan_run = launch(prepared, nan_dir, model_dir=poisoned, num_epochs=EPOCHS + 1)

  # Killed at an arbitrary step (whatever a checkpoint write is doing then), restarted with the same command.
  kill_at = int(np.random.default_rng().integers(2, EPOCHS * STEPS_PER_EPOCH - 1))
  proc = launch(prepared, k_dir)
  deadline = time.time() + 300
  ckpt_dir = os.path.join(k_dir, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    path = os.path.join(k_dir, "metrics.jsonl")
    # At a random step, once a first checkpoint is complete (Orbax renames a finished one to its bare step
    # number): killed before that, the restart would rightly start over and there would be no resume to test.
    finished = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
    if finished and os.path.exists(path) and max(read_jsonl(path) or {0: 0}) >= kill_at:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = launch(prepared, k_dir)
  assert resumed.wait(timeout=400) == 0, output(k_dir)[-3000:]
  assert "resumed from" in output(k_dir)
  k_train, k_val = losses(k_dir)
  assert sorted(k_train) == sorted(ref_train)
  np.testing.assert_allclose([k_train[s] for s in sorted(ref_train)], [ref_train[s] for s in sorted(ref_train)],
                             rtol=1e-6)
  np.testing.assert_allclose([k_val[s] for s in sorted(ref_val)], [ref_val[s] for s in sorted(ref_val)], rtol=1e-6)

  # Exports: each epoch's adapter, the final one, the merged UNet; the final adapter equals the reference's.
  from safetensors.numpy import load_file
  for e in range(1, EPOCHS + 1):
    assert os.path.exists(os.path.join(k_dir, "lora", f"epoch_{e}", "pytorch_lora_weights.safetensors"))
  a = load_file(os.path.join(k_dir, "export", "lora", "pytorch_lora_weights.safetensors"))
  b = load_file(os.path.join(ref_dir, "export", "lora", "pytorch_lora_weights.safetensors"))
  assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
  assert os.path.exists(os.path.join(k_dir, "export", "unet", "diffusion_pytorch_model.safetensors"))

  assert nan_run.wait(timeout=400) != 0
  text = output(nan_dir)
  assert "non-finite loss = nan" in text and "at step 7 (epoch 4, batch 1, stems ['" in text, text[-3000:]
  assert "last good checkpoint is step 6" in text
  assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())[-1] == 6
  assert mtimes() == before


@pytest.mark.slow
def test_two_processes_equal_one(prepared, tmp_path):
  """jax.distributed with a local coordinator (gloo collectives on CPU): 2 processes x 1 device give the losses of
  1 process x 2 devices on the same global batches."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = launch(prepared, one, devices=2, num_epochs=2)
  procs = [launch(prepared, two, log=f"{two}_{i}.log", env={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
                  num_epochs=2, **{"distributed.coordinator_address": f"localhost:{port}",
                                   "distributed.num_processes": 2, "distributed.process_id": i})
           for i in range(2)]
  for i, p in enumerate(procs):
    assert p.wait(timeout=600) == 0, output(two, f"{two}_{i}.log")[-3000:]
  assert single.wait(timeout=600) == 0, output(one)[-3000:]
  (a, a_val), (b, b_val) = losses(one), losses(two)
  assert sorted(a) == sorted(b) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=2e-5)
  np.testing.assert_allclose([b_val[s] for s in sorted(a_val)], [a_val[s] for s in sorted(a_val)], rtol=2e-5)


def test_bad_data_and_sharding_settings_fail_before_compute(prepared, tmp_path):
  """Each names its config field (and the folder) before any model is loaded or compiled."""
  from idmp_jax import parallel
  from idmp_jax.tasks import inpaint_sample, inpaint_train
  not_a_build = tmp_path / "not_a_build"
  not_a_build.mkdir()
  cases = [(dict(data_format="tfrecord"), ValueError, "config.data_format = 'tfrecord'"),
           (dict(data_format="array_record", array_record_dir=str(tmp_path / "missing")), FileNotFoundError,
            "config.array_record_dir = '.*missing'"),
           (dict(data_format="array_record", array_record_dir=str(not_a_build)), FileNotFoundError,
            "config.array_record_dir: .*not_a_build: no finished build-tfds output"),
           (dict(data_dir=str(tmp_path / "no_data")), FileNotFoundError, "config.data_dir = '.*no_data'")]
  mesh = parallel.make_mesh(load_config())
  for overrides, error, message in cases:
    with pytest.MonkeyPatch.context() as mp:  # "before compute": no model folder is opened
      for task in (inpaint_train, inpaint_sample):
        mp.setattr(task, "unet" if task is inpaint_train else "sampling", None)
      fields = {"model_dir": prepared["model_dir"], "data_dir": prepared["data_dir"], **overrides}
      with pytest.raises(error, match=message):
        inpaint_train.run(load_config(**fields), str(tmp_path / "train"), mesh)
      sample = inpaint_sample.default_config()
      for k, v in fields.items():
        setattr(sample, k, v)
      with pytest.raises(error, match=message):
        inpaint_sample.run(sample, str(tmp_path / "sample"), mesh)
  for field, message in ((dict(sharding_rules="fsdb"), "config.sharding_rules = 'fsdb': not a preset"),
                         (dict(sharding_rules=(("kernel$", "shard"),)), "tactic in"),
                         (dict(frozen_layouts="tiled"), "config.frozen_layouts = 'tiled'")):
    with pytest.raises(ValueError, match=message):
      inpaint_train.run(load_config(model_dir=prepared["model_dir"], data_dir=prepared["data_dir"], **field),
                        str(tmp_path / "rules"), mesh)
