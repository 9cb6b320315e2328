"""Classifier-free guidance (Ho & Salimans 2022) as DiffiT's official sampler applies it.

This module owns the guidance weight (constant; the power-cosine schedule of MDT that
DiffiT-256 uses [DiffiT Sec. 5.8]; a guidance interval in sigma, Kynkaanniemi et al. 2024),
the channel-restricted combination out = u + w (c - u) on the first `channels` channels
(DiffiT/DiT apply it to eps channels 0..2 only; the other eps channel and the variance channels
keep the conditional prediction), and the single network forward over [cond, uncond].

The conditional and unconditional copies are interleaved along the batch (row 2i is example
i with its label, row 2i+1 the same x with the null label) rather than concatenated, so a batch
sharded over devices stays local: each device doubles its own rows and no data moves between
devices. The network has no cross-example operations, so the order does not change results.

`forward_with_cfg(net, x, t, y, cfg_scale)` is the same guidance in the official release's
calling convention (DiT/MDT/DiffiT `forward_with_cfg`: a [cond; uncond] batch in, both halves
out), for code ported from it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffit_jax.diffusion.gaussian import per_example

GUIDANCE_SCHEDULES = ("constant", "power_cosine")


class Guidance(NamedTuple):
  """Static classifier-free guidance settings (compiled into the sampler).

  Attributes:
    scale: guidance scale w; 1 means no guidance (and no doubled batch).
    schedule: "constant" or "power_cosine" (w_t rises from 1 at t = T to w at t = 0).
    power: exponent of the power-cosine schedule (4 for DiffiT-256).
    channels: guide the first `channels` output channels (3 = official); None guides every
      prediction channel. Variance channels are never guided.
    interval: guide only where lo < sigma <= hi (None: everywhere). For ADM samplers,
      sigma_t = sqrt(1 / alpha_bar_t - 1).
    null_class: label of the unconditional class (num_classes; 1000 on ImageNet).
    num_timesteps: T of the original process in the power-cosine formula.
  """
  scale: float
  schedule: str
  power: float
  channels: int | None
  interval: tuple[float, float] | None
  null_class: int
  num_timesteps: int

  @property
  def active(self) -> bool:
    return self.scale != 1.0


def power_cosine_weight(t: jax.Array, scale: float, power: float = 4.0,
                        num_timesteps: int = 1000) -> jax.Array:
  """MDT's power-cosine guidance weight, as DiffiT-256 samples with it.

  w_t = 1 + (w - 1) * 0.5 * (1 - cos(pi * (1 - t / T)^power)).

  Args:
    t: ORIGINAL timestep index in [0, T), any shape.
    scale: the final guidance scale w (reached at t = 0).
    power: the exponent (4 in DiffiT).
    num_timesteps: T.

  Returns:
    w_t, t's shape, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  scale_step = 0.5 * (1 - jnp.cos(math.pi * (1 - t / num_timesteps) ** power))
  return 1 + (scale - 1) * scale_step


def guidance_weight(guidance: Guidance, *, t: jax.Array | None = None,
                    sigma: jax.Array | None = None) -> jax.Array:
  """The guidance scale at one sampling step.

  Args:
    guidance: the settings.
    t: original timestep index (needed by the power-cosine schedule).
    sigma: noise level (needed by a guidance interval).

  Returns:
    Scalar (or t's shape) weight w_t; 1 outside the interval.
  """
  if guidance.schedule == "constant":
    w = jnp.asarray(guidance.scale, jnp.float32)
  elif guidance.schedule == "power_cosine":
    if t is None:
      raise ValueError("The power-cosine guidance schedule needs the ADM timestep t; it is "
                       "defined for the ADM samplers only. Use guidance_schedule='constant'.")
    w = power_cosine_weight(t, guidance.scale, guidance.power, guidance.num_timesteps)
  else:
    raise ValueError(f"Unknown guidance schedule {guidance.schedule!r}; use one of "
                     f"{GUIDANCE_SCHEDULES}.")
  if guidance.interval is not None:
    lo, hi = guidance.interval
    inside = (sigma > lo) & (sigma <= hi)
    w = jnp.where(inside, w, 1.0)
  return w


def combine_cfg(cond: jax.Array, uncond: jax.Array, w: jax.Array, channels: int | None
                ) -> jax.Array:
  """u + w (c - u) on the first `channels` channels; the rest keep the conditional output.

  Args:
    cond: (B, H, W, K) conditional output.
    uncond: (B, H, W, K) unconditional output.
    w: scalar or (B,) guidance weight.
    channels: number of leading channels to guide (the whole K when None).

  Returns:
    (B, H, W, K) guided output.
  """
  w = per_example(jnp.asarray(w, cond.dtype), cond)  # (B,) -> (B, 1, 1, 1)
  k = cond.shape[-1] if channels is None else channels
  guided = uncond[..., :k] + w * (cond[..., :k] - uncond[..., :k])
  return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def cfg_forward(apply_fn: Callable[..., jax.Array], params: Any, x: jax.Array,
                t_in: jax.Array, y: jax.Array, w: jax.Array, *, channels: int | None,
                null_class: int, prediction_channels: int | None = None) -> jax.Array:
  """One network forward over [cond, uncond] and the guided output.

  Args:
    apply_fn: `apply_fn(params, x, t_in, y)`.
    params: network parameters.
    x: (B, H, W, C) input.
    t_in: (B,) time input (ADM timestep or EDM c_noise).
    y: (B,) class labels.
    w: scalar or (B,) guidance weight.
    channels: leading channels to guide; None guides `prediction_channels`.
    null_class: the unconditional label.
    prediction_channels: number of prediction (non-variance) channels, C by default.

  Returns:
    The guided network output, (B, H, W, K).
  """
  batch = x.shape[0]
  x2 = jnp.stack([x, x], axis=1).reshape((2 * batch,) + x.shape[1:])       # (2B, H, W, C)
  t2 = jnp.stack([t_in, t_in], axis=1).reshape((2 * batch,))               # (2B,)
  y2 = jnp.stack([y, jnp.full_like(y, null_class)], axis=1).reshape((2 * batch,))  # (2B,)
  out = apply_fn(params, x2, t2, y2).astype(jnp.float32)                   # (2B, H, W, K)
  out = out.reshape((batch, 2) + out.shape[1:])                            # (B, 2, H, W, K)
  if channels is None:
    channels = x.shape[-1] if prediction_channels is None else prediction_channels
  return combine_cfg(out[:, 0], out[:, 1], w, channels)


def forward_with_cfg(net: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x: jax.Array,
                     t: jax.Array, y: jax.Array, cfg_scale: float, *,
                     schedule: str = "constant", power: float = 4.0,
                     num_timesteps: int = 1000, channels: int = 3) -> jax.Array:
  """The official guided forward, `model.forward_with_cfg(x, t, y, cfg_scale)`, in NHWC.

  The batch holds the conditional half, then the unconditional half (labels = the null
  class); only the first half of `x` is used and fed to both. The guided eps replaces the
  first `channels` channels of both halves; the other channels (the 4th eps channel, the
  variance) keep each half's own prediction. DiffiT-256 uses schedule="power_cosine" with
  scale 4.4, DiffiT-512 "constant" with 1.49.

  Args:
    net: the network, `net(x, t, y)` (e.g. `nnx.merge(pipe.graphdef, params)` of what
      `inference.load` returns).
    x: (2B, H, W, C) inputs; x[B:] is ignored (the release passes a copy of x[:B]).
    t: (2B,) ORIGINAL timestep indices.
    y: (2B,) labels: B class labels, then B null labels.
    cfg_scale: the guidance scale w.
    schedule: "constant" or "power_cosine" (`power_cosine_weight`).
    power, num_timesteps: the power-cosine exponent and T.
    channels: leading channels to guide (3 in the release).

  Returns:
    (2B, H, W, K) network output with the guided channels in both halves.
  """
  batch = x.shape[0] // 2
  half = x[:batch]
  out = net(jnp.concatenate([half, half]), t, y)                        # (2B, H, W, K)
  if schedule == "power_cosine":
    w = power_cosine_weight(t[:batch], cfg_scale, power, num_timesteps)  # (B,)
  elif schedule == "constant":
    w = jnp.asarray(cfg_scale, jnp.float32)
  else:
    raise ValueError(f"Unknown guidance schedule {schedule!r}; use one of "
                     f"{GUIDANCE_SCHEDULES}.")
  guided = combine_cfg(out[:batch], out[batch:], w, channels)[..., :channels]  # (B, H, W, k)
  guided = jnp.concatenate([guided, guided]).astype(out.dtype)          # (2B, H, W, k)
  return jnp.concatenate([guided, out[..., channels:]], axis=-1)         # (2B, H, W, K)
