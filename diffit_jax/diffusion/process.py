"""The diffusion process a config describes: one entry point for training and sampling.

`from_config(config)` reads `config.diffusion` and returns the process the trainer, the
samplers and users share:

  `EDM`  Karras et al. 2022, the image-space DiffiT models: noise levels are sigmas
         (EDM's time t equals sigma), loss weighted by lambda(sigma) [EDM Eq. 8].
  `ADM`  IDDPM/ADM Gaussian diffusion, the latent DiffiT models: noise levels are step
         indices t in [0, T), hybrid L_simple + L_vlb loss [IDDPM Eq. 16] with the
         variance type that `config.diffusion.learn_sigma` implies.

`from_config` only reads and checks the config (no arrays are made). Both have
`sample_t(rng, batch_size)` (the training distribution of noise levels) and
`loss(model_fn, x0, y, *, t, noise)`, which returns the loss of every example; with `t`
and `noise` given it needs no PRNG key. `model_fn(x, t_in, y)` is the network as the
models define it, so a DiffiT model can be passed as it is.

Example (the training loss of one batch, without the trainer):

  config = config_lib.load_config("configs/mnist_demo.py:runlocal")
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  process = diffusion.from_config(config)
  x0 = jnp.zeros(models.input_shape(config.model, 8))       # (B, H, W, C) in [-1, 1]
  y = jnp.arange(8) % config.model.num_classes              # (B,) labels
  t_rng, noise_rng = jax.random.split(jax.random.key(0))
  t = process.sample_t(t_rng, 8)                            # (B,) sigmas or steps
  noise = jax.random.normal(noise_rng, x0.shape)            # (B, H, W, C)
  loss, aux = process.loss(model, x0, y, t=t, noise=noise)  # (B,); loss.mean() trains

(`nnx.jit(lambda m: process.loss(m, x0, y, t=t, noise=noise))(model)` compiles it once.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Union

import jax
import ml_collections
import numpy as np

from diffit_jax.diffusion import edm, gaussian
from diffit_jax.diffusion.respace import create_schedule

NAMES = ("edm", "adm")


@dataclasses.dataclass(frozen=True, eq=False)
class EDM:
  """EDM's process with the config's log-normal training sigmas and data std."""
  sigma_data: float
  p_mean: float
  p_std: float
  name: str = dataclasses.field(default="edm", init=False)

  def sample_t(self, rng: jax.Array, batch_size: int) -> jax.Array:
    """(B,) float32 training sigmas, ln(sigma) ~ N(p_mean, p_std^2) [EDM Table 1]."""
    return edm.sample_training_sigmas(rng, batch_size, self.p_mean, self.p_std)

  def loss(self, model_fn: edm.NetFn, x0: jax.Array, y: Any, *, t: jax.Array | None = None,
           noise: jax.Array | None = None, rng: jax.Array | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`edm.edm_loss` at sigmas `t`: ((B,) weighted loss, aux with (B,) "sigma", "mse").

    `rng` draws whichever of `t` and `noise` is not given.
    """
    return edm.edm_loss(model_fn, x0, y, rng, sigma=t, noise=noise, p_mean=self.p_mean,
                        p_std=self.p_std, sigma_data=self.sigma_data)


@dataclasses.dataclass(frozen=True, eq=False)
class ADM:
  """ADM's Gaussian process: the training schedule and what the network predicts."""
  beta_schedule: str                   # "linear" | "cosine"
  num_timesteps: int                   # T, the training steps
  pred_type: str                       # "eps" | "x0" | "v"
  var_type: str                        # "learned_range" with a learn_sigma network, else
                                       # "fixed_large"
  name: str = dataclasses.field(default="adm", init=False)

  @functools.cached_property
  def schedule(self) -> gaussian.GaussianSchedule:
    """All T training steps (samplers respace them), as concrete arrays.

    Built on first use, so that `from_config` touches no device (a multi-process run
    validates its config before `jax.distributed.initialize`), and outside any trace,
    so that one process serves any number of jitted functions.
    """
    with jax.ensure_compile_time_eval():
      return create_schedule(self.beta_schedule, self.num_timesteps)

  def respaced(self, respacing: str) -> gaussian.GaussianSchedule:
    """The sampling chain on the steps `respacing` keeps (`respace.space_timesteps`: "250",
    "ddim25", "10,15,20"), as concrete arrays; its `timestep_map` holds the original steps."""
    return create_schedule(self.beta_schedule, self.num_timesteps, respacing)

  def sigmas(self, timesteps: Any) -> np.ndarray:
    """The noise levels sqrt(1 / alpha_bar_t - 1) of original steps t, in float64: x_t /
    sqrt(alpha_bar_t) is x_0 + sigma_t n, EDM's "VE" coordinates."""
    alpha_bar = np.cumprod(1.0 - gaussian.get_named_beta_schedule(self.beta_schedule,
                                                                  self.num_timesteps))
    return np.sqrt(1.0 / alpha_bar[np.asarray(timesteps)] - 1.0)

  def sample_t(self, rng: jax.Array, batch_size: int) -> jax.Array:
    """(B,) int32 steps, t ~ U{0, ..., T-1} [DDPM Alg. 1]."""
    return gaussian.sample_timesteps(rng, batch_size, self.num_timesteps)

  def loss(self, model_fn: gaussian.ModelFn, x0: jax.Array, y: Any, *,
           t: jax.Array | None = None, noise: jax.Array | None = None,
           rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`gaussian.adm_loss` at steps `t`: ((B,) loss, aux with (B,) "mse", "vb", "t").

    `rng` draws whichever of `t` and `noise` is not given.
    """
    return gaussian.adm_loss(self.schedule, model_fn, x0, y, rng, t=t, noise=noise,
                             pred_type=self.pred_type, var_type=self.var_type)


Diffusion = Union[EDM, ADM]


def from_config(config: ml_collections.ConfigDict) -> Diffusion:
  """The diffusion process of `config.diffusion` (see the module docstring).

  Args:
    config: a run config (its `diffusion` group is read).

  Returns:
    `EDM` or `ADM`, following `config.diffusion.name`.

  Raises:
    ValueError: an unknown process, beta schedule or prediction type.
  """
  dif = config.diffusion
  if dif.name == "edm":
    return EDM(sigma_data=float(dif.sigma_data), p_mean=float(dif.p_mean),
               p_std=float(dif.p_std))
  if dif.name != "adm":
    raise ValueError(f"config.diffusion.name={dif.name!r}; use one of {NAMES}.")
  if dif.prediction not in gaussian.PRED_TYPES:
    raise ValueError(f"config.diffusion.prediction={dif.prediction!r}; use one of "
                     f"{gaussian.PRED_TYPES}.")
  num_timesteps = int(dif.num_timesteps)
  gaussian.get_named_beta_schedule(dif.beta_schedule, num_timesteps)  # checks, in NumPy
  return ADM(beta_schedule=dif.beta_schedule, num_timesteps=num_timesteps,
             pred_type=dif.prediction,
             var_type="learned_range" if dif.learn_sigma else "fixed_large")
