"""Scheduler parity with diffusers: timesteps exactly, every intermediate latent of a sampling loop (ours: jitted
lax.scan; the model is one NumPy function of (sample, timestep) for both, so errors propagate), DDPM training
quantities, and config loading/refusal."""
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr

from idmp_jax import schedulers as S
from idmp_jax.convert.torch_format import CheckpointError

# stabilityai/stable-diffusion-2-inpainting's scheduler/scheduler_config.json (no timestep_spacing key).
SD2_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def _write_hub_config(folder, **overrides):
  """A pipeline folder with scheduler/scheduler_config.json as the hub ships it (plus overrides)."""
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({**SD2_SCHEDULER, **overrides}, f)
  return str(folder)


def _pair(folder, class_name, n):
  """diffusers' `Class.from_config(PNDMScheduler.from_pretrained(...).config)` and ours from the same file."""
  base = diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler")
  ref = getattr(diffusers, class_name).from_config(base.config)
  ref.set_timesteps(n)
  ours = S.from_config(S.load_scheduler_config(folder), n, class_name)
  return ref, ours


def _run_and_compare(ref, ours, rng, dtype=jnp.float32):
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  assert ours.timesteps.dtype == np.int64
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-7, atol=0)
  assert ours.init_noise_sigma == ref.init_noise_sigma

  drift = rng.standard_normal(SHAPE).astype(np.float32)

  def model(x, t):  # the same deterministic "UNet" for both loops
    return (np.float32(0.3) * x + drift * np.float32(int(t) / 1000)).astype(np.float32)

  x = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(ref.init_noise_sigma)
  ref_traj, sample = [], torch.from_numpy(x)
  for t in ref.timesteps:
    out = torch.from_numpy(model(ref.scale_model_input(sample, t).numpy(), t))
    sample = ref.step(out, t, sample).prev_sample
    ref_traj.append(sample.numpy())
  ref_traj = np.stack(ref_traj)

  def model_fn(x, t):
    return jax.pure_callback(model, jax.ShapeDtypeStruct(x.shape, jnp.float32), x.astype(jnp.float32), t)

  final, traj = jax.jit(lambda x: ours.denoise(model_fn, x, return_trajectory=True))(jnp.asarray(x, dtype))
  assert final.dtype == dtype and traj.shape == ref_traj.shape
  if dtype != jnp.float32:
    return None
  scale = np.maximum(1.0, np.abs(ref_traj).reshape(len(ref_traj), -1).max(axis=1))
  err = (np.abs(np.asarray(traj) - ref_traj).reshape(len(ref_traj), -1).max(axis=1) / scale).max()
  assert err <= TOL, f"max error {err:.3g} relative to max(1, |latent|)"
  return err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("class_name", ["DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler"])
def test_sampling_parity_sd2_config(tmp_path, rng, class_name, n, prediction_type):
  folder = _write_hub_config(tmp_path, prediction_type=prediction_type)
  ref, ours = _pair(folder, class_name, n)
  if class_name == "PNDMScheduler":
    assert len(ours.timesteps) == n + 1
  _run_and_compare(ref, ours, rng)


VARIANTS = [  # (class, config overrides, steps): the other paths we implement
    ("DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.5), 20),
    ("DDIMScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=True, beta_schedule="linear",
                           beta_start=0.0001, beta_end=0.02), 25),
    ("PNDMScheduler", dict(skip_prk_steps=False, prediction_type="v_prediction", timestep_spacing="trailing"), 20),
    ("PNDMScheduler", dict(timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"), 20),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction"), 20),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun", final_sigmas_type="sigma_min",
                                         timestep_spacing="trailing"), 12),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", euler_at_final=True, solver_order=1), 15),
]


@pytest.mark.parametrize("class_name,overrides,n", VARIANTS)
def test_sampling_parity_variants(tmp_path, rng, class_name, overrides, n):
  ref, ours = _pair(_write_hub_config(tmp_path, **overrides), class_name, n)
  _run_and_compare(ref, ours, rng)


def test_saved_config_and_half_precision(tmp_path, rng):
  """A config written by diffusers' save_config (every PNDM key, timestep_spacing explicit) drives DPM++ the same
  way; a bf16 latent stays bf16 (arithmetic is fp32 inside)."""
  diffusers.PNDMScheduler.from_config(SD2_SCHEDULER).save_config(str(tmp_path))
  base = diffusers.PNDMScheduler.from_pretrained(str(tmp_path))
  ref = diffusers.DPMSolverMultistepScheduler.from_config(base.config)
  ref.set_timesteps(10)
  ours = S.from_config(S.load_scheduler_config(str(tmp_path / "scheduler_config.json")), 10, "dpm++")
  _run_and_compare(ref, ours, rng)
  ref.set_timesteps(10)  # reset diffusers' step counter
  _run_and_compare(ref, ours, rng, dtype=jnp.bfloat16)


def test_ddpm_training_quantities(tmp_path, rng):
  folder = _write_hub_config(tmp_path, prediction_type="v_prediction")
  ref = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
  ours = S.from_config(S.load_scheduler_config(folder), class_name="DDPMScheduler")
  assert isinstance(ours, S.DDPMScheduler)
  x0 = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.concatenate([[0, 999], rng.integers(0, 1000, 3)]).astype(np.int32)
  tt = torch.from_numpy(t.astype(np.int64))
  want_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  noisy = jax.jit(ours.add_noise)(x0, noise, t)
  v = jax.jit(ours.get_velocity)(x0, noise, t)
  np.testing.assert_allclose(noisy, want_noisy, rtol=0, atol=1e-6)
  np.testing.assert_allclose(v, want_v, rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax.jit(ours.training_target)(x0, noise, t), want_v, rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours.snr(t), compute_snr(ref, tt).numpy(), rtol=1e-6)
  # A scalar timestep broadcasts; bf16 in, bf16 out.
  assert ours.add_noise(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), 500).dtype == jnp.bfloat16
  eps = S.from_config(SD2_SCHEDULER, class_name="ddpm")
  assert eps.training_target(x0, noise, t) is noise


def _saved_config(folder, **kwargs):
  diffusers.DDIMScheduler(**kwargs).save_config(str(folder))
  return str(folder / "scheduler_config.json")


@pytest.mark.parametrize("kwargs,key", [
    (dict(thresholding=True), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(prediction_type="sample"), "prediction_type"),
])
def test_config_refuses_unsupported_values(tmp_path, kwargs, key):
  path = _saved_config(tmp_path, **kwargs)
  with pytest.raises(CheckpointError, match=f"{key}.*not supported") as e:
    S.load_scheduler_config(path)
  assert path in str(e.value)


def test_config_refuses_unknown_keys_and_classes(tmp_path):
  path = _write_hub_config(tmp_path, beta_schedule="sigmoid")
  with pytest.raises(CheckpointError, match="'beta_schedule' = 'sigmoid'.*not supported") as e:
    S.load_scheduler_config(path)
  assert "scheduler_config.json" in str(e.value)
  path = _write_hub_config(tmp_path, beta_schedule="scaled_linear", interpolation_type="linear")
  with pytest.raises(CheckpointError, match="'interpolation_type'"):
    S.load_scheduler_config(path)
  with pytest.raises(CheckpointError, match="_class_name"):
    S.from_config({**SD2_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}, 10)
  with pytest.raises(CheckpointError, match="class_name 'Heun'"):
    S.from_config(SD2_SCHEDULER, 10, "Heun")
  with pytest.raises(CheckpointError, match="no scheduler_config.json"):
    os.makedirs(tmp_path / "empty")
    S.load_scheduler_config(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="num_inference_steps"):
    S.from_config(SD2_SCHEDULER)
