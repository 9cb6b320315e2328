"""EDM (Karras et al. 2022): preconditioning, training loss and sigma schedule.

This module owns the continuous-sigma "VE" formulation x = x_0 + sigma n that DiffiT's
image-space models use ("we strictly followed ... EDM" [DiffiT App. I.1]): the preconditioned
denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) [EDM Eq. 7, Table 1], the log-normal
training sigmas, the loss weight lambda(sigma) [EDM Eq. 8] and the sampling discretization
sigma_i [EDM Eq. 5]. The samplers that integrate the ODE live in `samplers.py`.

`net_fn(x_in, c_noise, y) -> F` is the raw network: NHWC input, (B,) float noise conditioning,
output of x's shape.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffit_jax.diffusion.gaussian import loss_keys, mean_flat, per_example

# net_fn(x_in (B,H,W,C), c_noise (B,) float, y (B,) int or None) -> F (B,H,W,C).
NetFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def edm_precond(sigma: jax.Array, sigma_data: float = SIGMA_DATA
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """EDM preconditioning coefficients [EDM Table 1, "Ours"].

  Args:
    sigma: noise level(s), any shape.
    sigma_data: standard deviation of the data.

  Returns:
    (c_skip, c_out, c_in, c_noise), each of sigma's shape:
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
  c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
  c_in = 1 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
  c_noise = jnp.log(sigma) / 4
  return c_skip, c_out, c_in, c_noise


def edm_denoise(net_fn: NetFn, x: jax.Array, sigma: jax.Array, y: Any, *,
                sigma_data: float = SIGMA_DATA) -> jax.Array:
  """The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) [EDM Eq. 7].

  Args:
    net_fn: the raw network F, `net_fn(x_in, c_noise, y)`.
    x: (B, H, W, C) noisy input x_0 + sigma n.
    sigma: scalar or (B,) noise level.
    y: (B,) labels or None.
    sigma_data: standard deviation of the data.

  Returns:
    (B, H, W, C) estimate of x_0, float32.
  """
  c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
  c_noise = jnp.broadcast_to(c_noise, x.shape[:1])  # the network takes one value per example
  f = net_fn(per_example(c_in, x) * x, c_noise, y).astype(jnp.float32)
  return per_example(c_skip, x) * x + per_example(c_out, x) * f


def sample_training_sigmas(rng: jax.Array, batch_size: int, p_mean: float = P_MEAN,
                           p_std: float = P_STD) -> jax.Array:
  """ln(sigma) ~ N(P_mean, P_std^2) [EDM Table 1, training]: (B,) float32."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,), jnp.float32))


def edm_loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 [EDM Table 1], i.e. 1 / c_out^2."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(net_fn: NetFn, x0: jax.Array, y: Any, rng: jax.Array | None = None, *,
             sigma: jax.Array | None = None, noise: jax.Array | None = None,
             p_mean: float = P_MEAN, p_std: float = P_STD, sigma_data: float = SIGMA_DATA
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EDM's training loss E[lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2] [EDM Eq. 8].

  The reference (`training/loss.py` EDMLoss) sums the weighted error over pixels; this returns
  the mean over pixels per example, a constant factor C*H*W that Adam is invariant to (up to
  its epsilon).

  Args:
    net_fn: the raw network F, `net_fn(x_in, c_noise, y)`.
    x0: (B, H, W, C) clean data (scaled to about [-1, 1]).
    y: (B,) labels or None.
    rng: PRNG key for sigma and the noise; None when both are given.
    sigma: optional (B,) sigmas instead of sampling them.
    noise: optional (B, H, W, C) standard normal noise instead of sampling it.
    p_mean, p_std: log-normal sigma distribution.
    sigma_data: standard deviation of the data.

  Returns:
    ((B,) weighted loss per example, aux dict with (B,) "sigma" and the unweighted "mse").
  """
  sigma_rng, noise_rng = loss_keys(rng, sigma, noise, "sigma")
  # 1. ln sigma ~ N(P_mean, P_std^2).
  if sigma is None:
    sigma = sample_training_sigmas(sigma_rng, x0.shape[0], p_mean, p_std)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  # 2. Noise the data: x = x_0 + sigma n.
  x = x0 + per_example(sigma, x0) * noise
  # 3. Denoise with the preconditioned network [EDM Eq. 7].
  denoised = edm_denoise(net_fn, x, sigma, y, sigma_data=sigma_data)
  # 4. Weight the squared error by lambda(sigma) [EDM Eq. 8].
  mse = mean_flat((denoised - x0) ** 2)
  return edm_loss_weight(sigma, sigma_data) * mse, {"sigma": sigma, "mse": mse}


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> np.ndarray:
  """The EDM time discretization [EDM Eq. 5] with sigma_N = 0 appended.

  sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

  Args:
    num_steps: N >= 1 (a single step goes straight from sigma_max to 0).
    sigma_min, sigma_max, rho: the schedule.

  Returns:
    (N + 1,) float64 decreasing sigmas ending in 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  i = np.arange(num_steps, dtype=np.float64)
  denom = max(num_steps - 1, 1)
  sigmas = (sigma_max ** (1 / rho)
            + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return np.append(sigmas, 0.0)
