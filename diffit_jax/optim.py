"""The optimizer and the EMA of the weights, both from config.

Optimizer (`config.optimizer`): Adam (EDM's image-space recipe [EDM App. F.1]) or AdamW
(the DiT lineage the latent DiffiT follows, weight decay 0 by default), a linear
learning-rate warm-up and optional clipping of the global gradient norm.

EMA (`config.ema`), kept in the train state and used for sampling:
  * constant decay (`ema.decay`, e.g. 0.9999 as DiT/DiffiT): ema <- decay ema + (1-decay) p;
  * EDM's half-life form (`ema.halflife_kimg`, `ema.rampup_ratio`) [EDM App. F.1,
    `training_loop.py`]: beta = 0.5 ** (batch / halflife_nimg), with the half-life capped at
    `rampup_ratio` times the images seen so far, so early averages forget the random init.
Exactly one of the two is set; both 0 keeps the EMA equal to the weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffit_jax.config_lib import ConfigError

OPTIMIZERS = ("adam", "adamw")


def learning_rate_schedule(opt_config: Any) -> optax.Schedule:
  """lr * min((count + 1) / warmup_steps, 1): the first update already moves the weights.

  EDM ramps the rate linearly over `lr_rampup_kimg` images; `warmup_steps` is that
  length in steps (10 Mimg / batch size in the image configs).
  """
  lr = float(opt_config.learning_rate)
  warmup = int(opt_config.warmup_steps)
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum((count + 1) / warmup, 1.0)


def validate_optimizer_config(opt_config: Any) -> None:
  """Raises a ConfigError for an unknown optimizer or weight decay without AdamW."""
  if opt_config.name not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={opt_config.name!r}; use one of {OPTIMIZERS}.")
  if opt_config.name == "adam" and opt_config.weight_decay:
    raise ConfigError(f"config.optimizer.weight_decay={opt_config.weight_decay} needs "
                      "name='adamw' (Adam's L2 penalty is not decoupled weight decay).")


def create_optimizer(opt_config: Any) -> optax.GradientTransformation:
  """The optax chain `config.optimizer` describes: [clip] -> Adam/AdamW with warm-up.

  Args:
    opt_config: `config.optimizer` with name ("adam" | "adamw"), learning_rate, b1, b2,
      eps, weight_decay (AdamW only), warmup_steps and grad_clip_norm (0: no clipping).
  """
  validate_optimizer_config(opt_config)
  kwargs = dict(learning_rate=learning_rate_schedule(opt_config), b1=opt_config.b1,
                b2=opt_config.b2, eps=opt_config.eps)
  tx = (optax.adamw(weight_decay=float(opt_config.weight_decay), **kwargs)
        if opt_config.name == "adamw" else optax.adam(**kwargs))
  clip = float(opt_config.grad_clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def validate_ema_config(ema_config: Any) -> None:
  """Raises a ConfigError unless exactly one EMA form (or none) is set, with sane values."""
  decay, halflife = float(ema_config.decay), float(ema_config.halflife_kimg)
  if not 0.0 <= decay < 1.0:
    raise ConfigError(f"config.ema.decay={decay} must be in [0, 1).")
  if decay > 0 and halflife > 0:
    raise ConfigError(f"config.ema sets both decay={decay} and halflife_kimg={halflife}; "
                      "set the one you want and the other to 0.")
  if halflife < 0 or float(ema_config.rampup_ratio) < 0:
    raise ConfigError("config.ema.halflife_kimg and rampup_ratio must be >= 0.")


def ema_decay(step: jax.Array | int, ema_config: Any, batch_size: int) -> jax.Array:
  """The EMA decay beta for the update after optimizer step `step` (0-based).

  Args:
    step: steps completed before this one (EDM's `cur_nimg / batch_size`).
    ema_config: `config.ema`.
    batch_size: global batch size.

  Returns:
    float32 scalar beta; ema <- p + beta (ema - p).
  """
  decay = float(ema_config.decay)
  if decay > 0:
    return jnp.float32(decay)
  halflife_nimg = float(ema_config.halflife_kimg) * 1000.0
  if halflife_nimg <= 0:
    return jnp.float32(0.0)
  ratio = float(ema_config.rampup_ratio)
  halflife = jnp.float32(halflife_nimg)
  if ratio > 0:
    halflife = jnp.minimum(halflife, jnp.asarray(step, jnp.float32) * batch_size * ratio)
  return (0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))).astype(jnp.float32)


def update_ema(ema_params: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- p + decay (ema - p), EDM's `p_net.lerp(p_ema, beta)`."""
  return jax.tree.map(lambda e, p: p + decay * (e - p), ema_params, params)
