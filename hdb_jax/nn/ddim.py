"""The noise schedule of Stable Diffusion and the DDIM update (eta = 0), as pure functions.

`DDIMConfig.from_dict` reads a diffusers `scheduler_config.json` (SD1.5 ships a PNDM one;
only the keys that define the schedule matter, the sampler is ours). The arithmetic is
float32 in JAX:

    betas           scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2
    alphas_cumprod  cumprod(1 - betas)                                        # [T]
    add_noise       sqrt(a_t) x0 + sqrt(1 - a_t) eps
    velocity        sqrt(a_t) eps - sqrt(1 - a_t) x0       (v-prediction target)
    DDIM step       x0 = prediction of x0; x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps

Inference timesteps are diffusers' "leading" spacing plus `steps_offset`: for T = 1000,
25 steps, offset 1: 961, 921, ..., 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
  """The schedule keys of a diffusers scheduler config (defaults as diffusers')."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = "epsilon"

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> DDIMConfig:
    """From a scheduler_config.json dict; other keys (PNDM's skip_prk_steps, ...) ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in names}
    if values.get("trained_betas") is not None:
      values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
    out = cls(**values)
    if out.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"scheduler prediction_type {out.prediction_type!r} is not supported "
                       f"(one of {PREDICTION_TYPES})")
    if out.trained_betas is None and out.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"scheduler beta_schedule {out.beta_schedule!r} is not supported "
                       f"(one of {BETA_SCHEDULES})")
    spacing = dict(config).get("timestep_spacing", "leading")
    if spacing != "leading":
      raise ValueError(f"scheduler timestep_spacing {spacing!r} is not supported (leading)")
    return out

  def to_dict(self) -> dict:
    """A scheduler_config.json for diffusers' DDIMScheduler."""
    out = dataclasses.asdict(self)
    if out["trained_betas"] is not None:
      out["trained_betas"] = list(out["trained_betas"])
    return {"_class_name": "DDIMScheduler", **out}


def _betas(config: DDIMConfig) -> jnp.ndarray:
  """[T] float32."""
  steps = config.num_train_timesteps
  if config.trained_betas is not None:
    return jnp.asarray(config.trained_betas, jnp.float32)
  if config.beta_schedule == "linear":
    return jnp.linspace(config.beta_start, config.beta_end, steps, dtype=jnp.float32)
  if config.beta_schedule == "scaled_linear":
    return jnp.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, steps,
                        dtype=jnp.float32) ** 2
  # Glide's cosine schedule
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return jnp.asarray([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                      for i in range(steps)], jnp.float32)


def alphas_cumprod(config: DDIMConfig) -> jnp.ndarray:
  """Cumulative products of (1 - beta): [T] float32."""
  return jnp.cumprod(1.0 - _betas(config), axis=0)


def _per_example(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """values [B] (or scalar) -> broadcastable to like [B, ...]."""
  values = jnp.reshape(values, (-1,))
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def add_noise(config: DDIMConfig, samples, noise, timesteps):
  """Noisy samples at `timesteps` [B]: sqrt(a_t) x0 + sqrt(1 - a_t) noise, like samples."""
  alpha = alphas_cumprod(config)[timesteps]
  return (_per_example(alpha ** 0.5, samples) * samples
          + _per_example((1 - alpha) ** 0.5, samples) * noise)


def velocity(config: DDIMConfig, samples, noise, timesteps):
  """The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0, like samples."""
  alpha = alphas_cumprod(config)[timesteps]
  return (_per_example(alpha ** 0.5, samples) * noise
          - _per_example((1 - alpha) ** 0.5, samples) * samples)


def timesteps(config: DDIMConfig, num_steps: int) -> np.ndarray:
  """The DDIM inference timesteps, descending: int32 [num_steps] (static: a host array)."""
  ratio = config.num_train_timesteps // num_steps
  return (np.arange(num_steps)[::-1] * ratio + config.steps_offset).astype(np.int32)


def step(config: DDIMConfig, model_output, timestep, sample, num_steps: int):
  """One deterministic DDIM step (eta = 0) from `timestep` to the previous one of a
  `num_steps`-step schedule: the sample at the previous timestep, like `sample`."""
  cumprod = alphas_cumprod(config)
  final = jnp.float32(1.0) if config.set_alpha_to_one else cumprod[0]
  previous = timestep - config.num_train_timesteps // num_steps
  alpha = cumprod[timestep]
  alpha_prev = jnp.where(previous >= 0, cumprod[jnp.maximum(previous, 0)], final)
  beta = 1 - alpha
  if config.prediction_type == "epsilon":
    original = (sample - beta ** 0.5 * model_output) / alpha ** 0.5
    epsilon = model_output
  elif config.prediction_type == "sample":
    original = model_output
    epsilon = (sample - alpha ** 0.5 * original) / beta ** 0.5
  else:  # v_prediction
    original = alpha ** 0.5 * sample - beta ** 0.5 * model_output
    epsilon = alpha ** 0.5 * model_output + beta ** 0.5 * sample
  if config.clip_sample:
    original = jnp.clip(original, -config.clip_sample_range, config.clip_sample_range)
  return alpha_prev ** 0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon
