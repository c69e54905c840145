"""Diffusion schedulers in JAX with diffusers' numerics: DDPM (training), DDIM, PNDM, DPM-Solver++ (sampling).

Configs are the stock `scheduler/scheduler_config.json`. As with diffusers' `XScheduler.from_config(config)`, any
supported class can be built from any config: keys the class does not take are ignored, keys the file lacks take
that class's diffusers default (so DPM-Solver++ from SD-2's PNDM file gets `timestep_spacing` "linspace").
Keys or values we do not implement are refused, naming the key and the file.

Sampling schedulers are built outside jit for a fixed `num_inference_steps`; everything that depends on the step
is precomputed into per-step tables (fp32, in the same operation order as diffusers' scalar torch code), so
`step(state, model_output, step_index, sample)` works with a traced `step_index` inside `lax.scan`. The state is
a pytree of fixed-shape fp32 arrays (model-output history, cached samples). All arithmetic is fp32 whatever the
latent dtype; results are cast back to the sample's dtype.

  sched = from_config(load_scheduler_config(folder), 50, "DPMSolverMultistepScheduler")
  latents = sched.denoise(model_fn, noise * sched.init_noise_sigma)   # inside jit
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.convert.torch_format import CheckpointError, check_config_keys, read_json

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


# ----------------------------------------------------------------------------------------------------------------
# Config.


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_bool(v):
  return isinstance(v, bool)


def _one_of(*values):
  return lambda v: v in values


# Every key any supported class reads, with the values we implement. Keys that only matter for features we refuse
# (thresholding's ratio, flow shift) accept anything, as diffusers ignores them then.
_SUPPORTED = {
    "num_train_timesteps": lambda v: _is_int(v) and v > 0,
    "beta_start": _is_num,
    "beta_end": _is_num,
    "beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": lambda v: v is None or (isinstance(v, list) and all(_is_num(b) for b in v)),
    "prediction_type": _one_of("epsilon", "v_prediction"),
    "timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "steps_offset": lambda v: _is_int(v) and v >= 0,
    "set_alpha_to_one": _is_bool,
    "clip_sample": _is_bool,
    "clip_sample_range": lambda v: _is_num(v) and v > 0,
    "thresholding": _one_of(False),
    "dynamic_thresholding_ratio": None,
    "sample_max_value": None,
    "rescale_betas_zero_snr": _one_of(False),
    # Only DDPM.step (not ported) reads the fixed_* kinds; DPM-Solver would slice channels for learned ones.
    "variance_type": _one_of(None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "skip_prk_steps": _is_bool,
    "solver_order": _one_of(1, 2, 3),
    "algorithm_type": _one_of("dpmsolver++"),
    "solver_type": _one_of("midpoint", "heun"),
    "lower_order_final": _is_bool,
    "euler_at_final": _is_bool,
    "final_sigmas_type": _one_of("zero", "sigma_min"),
    "lambda_min_clipped": lambda v: _is_num(v) and v == -math.inf,
    "use_karras_sigmas": _one_of(False),
    "use_exponential_sigmas": _one_of(False),
    "use_beta_sigmas": _one_of(False),
    "use_lu_lambdas": _one_of(False),
    "use_flow_sigmas": _one_of(False),
    "use_dynamic_shifting": _one_of(False),
    "flow_shift": None,
    "time_shift_type": None,
}

_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


def load_scheduler_config(path: str) -> dict:
  """Reads and validates a scheduler config: a `scheduler_config.json`, a folder holding one, or a pipeline folder
  with `scheduler/scheduler_config.json`. The file's path is kept under `_source` for later error messages."""
  if os.path.isdir(path):
    candidates = [os.path.join(path, SCHEDULER_CONFIG_NAME), os.path.join(path, "scheduler", SCHEDULER_CONFIG_NAME)]
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
      raise CheckpointError(f"{path}: no {SCHEDULER_CONFIG_NAME} (nor scheduler/{SCHEDULER_CONFIG_NAME})")
    path = found[0]
  config = read_json(path)
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  check_config_keys(config, _SUPPORTED, source=path)
  return {**config, "_source": path}


def from_config(config: Mapping[str, Any], num_inference_steps: int | None = None, class_name: str | None = None):
  """Builds the scheduler named by `class_name` (default: the config's `_class_name`) from a config dict.
  Sampling schedulers need `num_inference_steps`; DDPMScheduler (training) takes none."""
  source = config.get("_source", "scheduler config")
  check_config_keys(config, _SUPPORTED, source=source)
  name = class_name if class_name is not None else config.get("_class_name")
  cls = _CLASSES.get(name) or _CLASSES.get(_ALIASES.get(str(name).lower(), ""))
  if cls is None:
    what = f"class_name {name!r}" if class_name is not None else f"config key '_class_name' = {name!r}"
    raise CheckpointError(f"{source}: {what} is not supported (choose from {sorted(_CLASSES)} or {sorted(_ALIASES)})")
  resolved = {k: config.get(k, default) for k, default in cls.defaults.items()}
  if cls is DDPMScheduler:
    return cls(resolved, source=source)
  if num_inference_steps is None:
    raise ValueError(f"{cls.__name__} needs num_inference_steps")
  return cls(resolved, int(num_inference_steps), source=source)


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule shared by all classes.


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(..., dtype=float32) bit for bit: fp32 step, values formed in double from the nearer end."""
  a, b = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([a], np.float32)
  step = np.float64((b - a) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  return np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i)).astype(np.float32)


def _alphas_cumprod(cfg: Mapping[str, Any], source: str) -> np.ndarray:
  n = cfg["num_train_timesteps"]
  if cfg["trained_betas"] is not None:
    betas = np.asarray(cfg["trained_betas"], np.float32)
    if betas.shape != (n,):
      raise CheckpointError(f"{source}: config key 'trained_betas' has {betas.size} values, "
                            f"num_train_timesteps is {n}")
  elif cfg["beta_schedule"] == "linear":
    betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
  elif cfg["beta_schedule"] == "scaled_linear":
    betas = np.square(_torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n))
  else:  # squaredcos_cap_v2 (GLIDE's cosine), computed in double as diffusers does, then fp32.
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
  # torch's CPU cumprod accumulates fp32 in double.
  return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def _expand(coef, x):
  """Per-example coefficients (shape of t) broadcast over the trailing dims of x."""
  return jnp.reshape(coef, jnp.shape(coef) + (1,) * (x.ndim - jnp.ndim(coef)))


class _Schedule:
  defaults: dict = _COMMON_DEFAULTS

  def __init__(self, config: Mapping[str, Any], *, source: str = "scheduler config"):
    self.config = dict(config)
    self.source = source
    self.num_train_timesteps = config["num_train_timesteps"]
    self.prediction_type = config["prediction_type"]
    self.alphas_cumprod = _alphas_cumprod(config, source)  # np fp32 (num_train_timesteps,)


class DDPMScheduler(_Schedule):
  """Training-side forward process. `t` is an int array (one per example, or a scalar); jittable."""

  def __init__(self, config, *, source="scheduler config"):
    super().__init__(config, source=source)
    ac = self.alphas_cumprod
    self._sqrt_alpha = jnp.asarray(np.sqrt(ac))
    self._sqrt_one_minus_alpha = jnp.asarray(np.sqrt(np.float32(1) - ac))
    # diffusers.training_utils.compute_snr: (sqrt(a) / sqrt(1 - a)) ** 2, all fp32.
    self._snr = jnp.asarray(np.square(np.sqrt(ac) / np.sqrt(np.float32(1) - ac)))

  def _coefs(self, x, t):
    return _expand(self._sqrt_alpha[t], x), _expand(self._sqrt_one_minus_alpha[t], x)

  def add_noise(self, x0, noise, t):
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a, s = self._coefs(x0, t)
    return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)

  def get_velocity(self, x0, noise, t):
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a, s = self._coefs(x0, t)
    return (a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)).astype(x0.dtype)

  def training_target(self, x0, noise, t):
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    return noise if self.prediction_type == "epsilon" else self.get_velocity(x0, noise, t)

  def snr(self, t):
    """Signal-to-noise ratio a_t / (1 - a_t) per timestep, fp32, shape of t (for min-SNR weighting)."""
    return self._snr[t]


# ----------------------------------------------------------------------------------------------------------------
# Sampling schedulers.


def _spaced_timesteps(spacing: str, n: int, num_train: int, offset: int) -> np.ndarray:
  """DDIM/PNDM inference timesteps, DESCENDING (DDIMScheduler.set_timesteps)."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
  if spacing == "leading":
    return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.int64) + offset
  return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1  # trailing


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


class _Sampler(_Schedule):
  """Common interface. `timesteps` (np.int64) is exactly diffusers' `scheduler.timesteps`; call the model once per
  entry, then `step` with that entry's index."""
  init_noise_sigma = 1.0

  def __init__(self, config, num_inference_steps: int, *, source="scheduler config"):
    super().__init__(config, source=source)
    if not 1 <= num_inference_steps <= self.num_train_timesteps:
      raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}")
    self.num_inference_steps = num_inference_steps

  def _alpha(self, t: int) -> np.float32:
    """alphas_cumprod[t], with diffusers' final value for t < 0."""
    if t >= self.num_train_timesteps:
      raise ValueError(f"{self.source}: timestep {t} out of range for {self.num_train_timesteps} train steps")
    if t < 0:
      return np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
    return self.alphas_cumprod[t]

  def scale_model_input(self, sample, step_index):
    del step_index  # These schedulers do not scale the model input.
    return sample

  def init_state(self, sample) -> dict:
    return {}

  def step(self, state, model_output, step_index, sample):
    raise NotImplementedError

  def denoise(self, model_fn: Callable, sample, *, return_trajectory: bool = False):
    """The whole loop as one `lax.scan` (call under jit). `model_fn(model_input, timestep) -> model_output`, with
    `timestep` an int32 scalar. Returns the final sample, plus every step's sample if `return_trajectory`."""
    n = len(self.timesteps)

    def body(carry, xs):
      x, state = carry
      i, t = xs
      x, state = self.step(state, model_fn(self.scale_model_input(x, i), t), i, x)
      return (x, state), (x if return_trajectory else None)

    xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(self.timesteps, jnp.int32))
    (x, _), trajectory = jax.lax.scan(body, (sample, self.init_state(sample)), xs)
    return (x, trajectory) if return_trajectory else x


class DDIMScheduler(_Sampler):
  """Deterministic DDIM (eta 0)."""
  defaults = {**_COMMON_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}

  def __init__(self, config, num_inference_steps, *, source="scheduler config"):
    super().__init__(config, num_inference_steps, source=source)
    c = self.config
    self.timesteps = _spaced_timesteps(c["timestep_spacing"], num_inference_steps, self.num_train_timesteps,
                                       c["steps_offset"])
    ratio = self.num_train_timesteps // num_inference_steps  # diffusers uses this gap for every spacing
    a_t = np.array([self._alpha(int(t)) for t in self.timesteps], np.float32)
    a_prev = np.array([self._alpha(int(t) - ratio) for t in self.timesteps], np.float32)
    one = np.float32(1)
    self._sqrt_a, self._sqrt_b = _f32(np.sqrt(a_t)), _f32(np.sqrt(one - a_t))
    self._sqrt_a_prev, self._sqrt_b_prev = _f32(np.sqrt(a_prev)), _f32(np.sqrt(one - a_prev))

  def step(self, state, model_output, step_index, sample):
    x, m = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    sa, sb = self._sqrt_a[step_index], self._sqrt_b[step_index]
    if self.prediction_type == "epsilon":
      x0, eps = (x - sb * m) / sa, m
    else:
      x0, eps = sa * x - sb * m, sa * m + sb * x
    if self.config["clip_sample"]:
      r = self.config["clip_sample_range"]
      x0 = jnp.clip(x0, -r, r)
    prev = self._sqrt_a_prev[step_index] * x0 + self._sqrt_b_prev[step_index] * eps
    return prev.astype(sample.dtype), state


class PNDMScheduler(_Sampler):
  """PNDM: with `skip_prk_steps` the PLMS (Adams-Bashforth) sampler whose second call repeats a timestep and
  restarts from the first sample (diffusers' warm start, `num_inference_steps + 1` model calls); otherwise 12
  Runge-Kutta (PRK) calls on the last four timesteps, then 4th-order PLMS."""
  defaults = {**_COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False}
  # Step kinds: how the effective model output is formed (see _KIND_FNS).
  FIRST, WARM, AB2, AB3, AB4, PRK0, PRK1, PRK2, PRK3 = range(9)

  def __init__(self, config, num_inference_steps, *, source="scheduler config"):
    super().__init__(config, num_inference_steps, source=source)
    c, n, T = self.config, num_inference_steps, self.num_train_timesteps
    ratio = T // n
    ascending = _spaced_timesteps(c["timestep_spacing"], n, T, c["steps_offset"])[::-1]
    rows = []  # (kind, timestep used, previous timestep) per model call
    if c["skip_prk_steps"]:
      if n < 2:
        raise ValueError(f"{source}: PNDM with skip_prk_steps needs num_inference_steps >= 2")
      ts = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
      for i, t in enumerate(int(t) for t in ts):
        if i == 1:  # warm start: re-step from the first sample over the first interval, averaging outputs
          rows.append((self.WARM, t + ratio, t))
        else:
          rows.append(({0: self.FIRST, 2: self.AB2, 3: self.AB3}.get(i, self.AB4), t, t - ratio))
    else:
      if n < 4:
        raise ValueError(f"{source}: PNDM with PRK steps needs num_inference_steps >= 4")
      half = ratio // 2
      prk = np.repeat(ascending[-4:], 2) + np.tile([0, half], 4)
      prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
      for i, t in enumerate(int(t) for t in prk):
        rows.append((self.PRK0 + i % 4, int(prk[i // 4 * 4]), t - (0 if i % 2 else half)))
      ts = np.concatenate([prk, ascending[:-3][::-1]])
      rows += [(self.AB4, int(t), int(t) - ratio) for t in ascending[:-3][::-1]]
    self.timesteps = ts.astype(np.int64)
    kinds, t_used, t_prev = zip(*rows)
    self._kind = jnp.asarray(np.array(kinds, np.int32))
    a_t = np.array([self._alpha(t) for t in t_used], np.float32)
    a_p = np.array([self._alpha(t) for t in t_prev], np.float32)
    one = np.float32(1)
    # diffusers' _get_prev_sample, formula (9) of the PNDM paper, split into its fp32 scalar factors.
    self._sqrt_a, self._sqrt_b = _f32(np.sqrt(a_t)), _f32(np.sqrt(one - a_t))
    self._sample_coef = _f32(np.sqrt(a_p / a_t))
    self._diff = _f32(a_p - a_t)
    self._denom = _f32(a_t * np.sqrt(one - a_p) + np.sqrt(a_t * (one - a_t) * a_p))

  def init_state(self, sample):
    z = jnp.zeros(sample.shape, jnp.float32)
    # ets: past model outputs, most recent first; cur: the sample a multi-call step restarts from; acc: PRK sum.
    return {"ets": jnp.zeros((4,) + sample.shape, jnp.float32), "cur": z, "acc": z}

  @staticmethod
  def _push(ets, m):
    return jnp.concatenate([m[None], ets[:-1]], axis=0)

  def _kind_fns(self):
    push = self._push

    def first(m, x, s):
      return m, x, {**s, "ets": push(s["ets"], m), "cur": x}

    def warm(m, x, s):
      return (m + s["ets"][0]) / 2, s["cur"], s

    def ab2(m, x, s):
      e = push(s["ets"], m)
      return (3 * e[0] - e[1]) / 2, x, {**s, "ets": e}

    def ab3(m, x, s):
      e = push(s["ets"], m)
      return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12, x, {**s, "ets": e}

    def ab4(m, x, s):
      e = push(s["ets"], m)
      return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]), x, {**s, "ets": e}

    def prk0(m, x, s):
      return m, x, {"ets": push(s["ets"], m), "cur": x, "acc": 1 / 6 * m}

    def prk12(m, x, s):
      return m, s["cur"], {**s, "acc": s["acc"] + 1 / 3 * m}

    def prk3(m, x, s):
      return s["acc"] + 1 / 6 * m, s["cur"], {**s, "acc": jnp.zeros_like(m)}

    return [first, warm, ab2, ab3, ab4, prk0, prk12, prk12, prk3]

  def step(self, state, model_output, step_index, sample):
    m, x = model_output.astype(jnp.float32), sample.astype(jnp.float32)
    m, x, state = jax.lax.switch(self._kind[step_index], self._kind_fns(), m, x, state)
    if self.prediction_type == "v_prediction":  # to epsilon, against the sample being stepped
      m = self._sqrt_a[step_index] * m + self._sqrt_b[step_index] * x
    prev = self._sample_coef[step_index] * x - self._diff[step_index] * m / self._denom[step_index]
    return prev.astype(sample.dtype), state


class DPMSolverMultistepScheduler(_Sampler):
  """DPM-Solver++ (data prediction), multistep, orders 1-3, midpoint or heun second order, no noise."""
  defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2, "algorithm_type": "dpmsolver++",
              "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
              "final_sigmas_type": "zero"}

  def __init__(self, config, num_inference_steps, *, source="scheduler config"):
    super().__init__(config, num_inference_steps, source=source)
    c, n, T = self.config, num_inference_steps, self.num_train_timesteps
    if c["timestep_spacing"] == "linspace":
      ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif c["timestep_spacing"] == "leading":
      ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + c["steps_offset"]
    else:
      ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    self.timesteps = ts
    ac = self.alphas_cumprod
    all_sigmas = np.sqrt((np.float32(1) - ac) / ac)
    last = np.float32(0) if c["final_sigmas_type"] == "zero" else all_sigmas[0]
    sigmas = np.concatenate([all_sigmas[ts], [last]]).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
      alpha = np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))
      sigma = sigmas * alpha
      lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma
    steps = len(ts)
    order, tab = [], {k: np.zeros(steps, np.float32) for k in
                      ("c_x", "c_d0", "half_c_d0", "c_d1", "inv_r0", "inv_r1", "w_d1", "inv_r01", "c_d2")}
    for i in range(steps):
      final = i == steps - 1 and (c["euler_at_final"] or (c["lower_order_final"] and steps < 15)
                                  or c["final_sigmas_type"] == "zero")
      second = i == steps - 2 and c["lower_order_final"] and steps < 15
      k = 1 if (c["solver_order"] == 1 or i < 1 or final) else (
          2 if (c["solver_order"] == 2 or i < 2 or second) else 3)
      order.append(k)
      with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        h = lam[i + 1] - lam[i]
        em1 = np.exp(-h) - np.float32(1)  # exp(-h) - 1, as diffusers forms it
        tab["c_x"][i] = sigma[i + 1] / sigma[i]
        tab["c_d0"][i] = alpha[i + 1] * em1
        tab["half_c_d0"][i] = np.float32(0.5) * tab["c_d0"][i]
        if k >= 2:
          r0 = (lam[i] - lam[i - 1]) / h
          tab["inv_r0"][i] = np.float32(1) / r0
          tab["c_d1"][i] = alpha[i + 1] * (em1 / h + np.float32(1))
        if k == 3:
          r1 = (lam[i - 1] - lam[i - 2]) / h
          tab["inv_r1"][i] = np.float32(1) / r1
          tab["w_d1"][i] = r0 / (r0 + r1)
          tab["inv_r01"][i] = np.float32(1) / (r0 + r1)
          tab["c_d2"][i] = alpha[i + 1] * ((em1 + h) / (h * h) - np.float32(0.5))
    self._order = jnp.asarray(np.array(order, np.int32))
    self._alpha_s, self._sigma_s = _f32(alpha), _f32(sigma)  # at sigmas[i], for the x0 conversion
    self._tab = {k: _f32(v) for k, v in tab.items()}
    self._hist = c["solver_order"]

  def init_state(self, sample):
    # Converted model outputs (x0 predictions), oldest first, like diffusers' `model_outputs`.
    return {"x0": jnp.zeros((self._hist,) + sample.shape, jnp.float32)}

  def step(self, state, model_output, step_index, sample):
    i, m, x = step_index, model_output.astype(jnp.float32), sample.astype(jnp.float32)
    a, s = self._alpha_s[i], self._sigma_s[i]
    x0 = (x - s * m) / a if self.prediction_type == "epsilon" else a * x - s * m
    hist = jnp.concatenate([state["x0"][1:], x0[None]], axis=0)
    g = {k: v[i] for k, v in self._tab.items()}

    def first(h):
      return g["c_x"] * x - g["c_d0"] * h[-1]

    def second(h):
      d1 = g["inv_r0"] * (h[-1] - h[-2])
      if self.config["solver_type"] == "midpoint":
        return g["c_x"] * x - g["c_d0"] * h[-1] - g["half_c_d0"] * d1
      return g["c_x"] * x - g["c_d0"] * h[-1] + g["c_d1"] * d1

    def third(h):
      d1_0, d1_1 = g["inv_r0"] * (h[-1] - h[-2]), g["inv_r1"] * (h[-2] - h[-3])
      d1 = d1_0 + g["w_d1"] * (d1_0 - d1_1)
      d2 = g["inv_r01"] * (d1_0 - d1_1)
      return g["c_x"] * x - g["c_d0"] * h[-1] + g["c_d1"] * d1 - g["c_d2"] * d2

    branches = [first, second, third][:self._hist]
    prev = jax.lax.switch(self._order[i] - 1, branches, hist) if len(branches) > 1 else first(hist)
    return prev.astype(sample.dtype), {"x0": hist}


_CLASSES = {cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler)}
_ALIASES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
            "dpm++": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}
