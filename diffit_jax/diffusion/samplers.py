"""JIT-compiled, data-parallel samplers for ADM (latent DiffiT) and EDM (image DiffiT) models.

This module owns sampling: ADM's ancestral DDPM sampler on a respaced chain with learned
variance [DDPM Alg. 2, IDDPM Sec. 4], DDIM [DDIM Eq. 12], EDM's Heun sampler [EDM Alg. 1,
with Alg. 2's optional churn], Euler, and DPM-Solver++(2M) [Lu et al. 2022, Alg. 2], each with
classifier-free guidance (`guidance.py`). `SamplerConfig.from_config(config)` reads a run
config's sampler settings (the schema in `config_lib` holds their defaults) and
`make_sampler(settings, apply_fn, shape)` returns one `jax.jit`-compiled function per
setting whose whole loop is a `lax.fori_loop` (no host round trips), with the batch sharded
over the mesh's batch axes ("data" and, when the mesh has it, "fsdp":
`diffit_jax.sharding.BATCH_AXES`).

Model-function contract. `apply_fn(params, x, t_in, y) -> out` is a pure function:
  * x: (B, H, W, C) float32, NHWC.
  * t_in: (B,) time input. ADM formulation: the ORIGINAL int32 timestep in [0, T_0) (also on
    a respaced chain). EDM formulation: float32 c_noise = ln(sigma) / 4.
  * y: (B,) int32 labels (null class = num_classes for the unconditional half of guidance),
    or None for an unconditional model.
  * out: ADM: (B, H, W, 2C) when var_type="learned_range" (prediction then variance values in
    [-1, 1]) else (B, H, W, C); EDM: the raw network F, (B, H, W, C).
`params` is an argument of the compiled function, not a constant baked into it; pass it
already placed on the mesh (replicated, or FSDP-sharded). For a Flax NNX model use
`diffit_jax.models.nnx_apply_fn(model)`, which returns `(apply_fn, state)`.

Randomness. The key of sample i is fold_in(key(seed), sample_indices[i]); its initial noise
uses fold_in(key_i, 0) and step j's noise fold_in(key_i, j + 1). A caller may pass that
initial noise itself (`x_T`, standard normal, e.g. to compare with another implementation
or to interpolate between samples); drawing it from the seed is the same as passing
`initial_noise(seed, sample_indices, shape)`. A sample therefore depends
only on (seed, its global index, its label), never on the batch size or the device count
(bit-identical for any batch on one mesh; across device counts XLA compiles a different
per-device program, which can differ in the last float32 bits).

The ODE samplers (heun, euler, dpmpp_2m) run in EDM's "VE" coordinates x = x_0 + sigma n.
For an ADM model they use the chain's own noise levels sigma_k = sqrt(1 / alpha_bar_k - 1) at
the kept timesteps (x_ve = x_t / sqrt(alpha_bar)), so the network is only ever evaluated at
timesteps it was trained on; on that grid Euler is exactly DDIM with eta = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffit_jax import sharding as sharding_lib
from diffit_jax.diffusion import edm as edm_lib
from diffit_jax.diffusion import process as diffusion_process
from diffit_jax.diffusion.gaussian import (GaussianSchedule, extract, p_mean_variance,
                                           per_example, predict_eps_from_x0)
from diffit_jax.diffusion.guidance import Guidance, cfg_forward, guidance_weight
from diffit_jax.diffusion.process import Diffusion
from diffit_jax.diffusion.respace import space_timesteps

# apply_fn(params, x (B,H,W,C), t_in (B,), y (B,) or None) -> (B,H,W,K); see the module docstring.
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]

ADM_SAMPLERS = ("ddpm", "ddim", "heun", "euler", "dpmpp_2m")
EDM_SAMPLERS = ("heun", "euler", "dpmpp_2m")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Everything that fixes a compiled sampler: `config.sampler` for the run's process.

  Build it with `SamplerConfig.from_config(config)`: the schema (`config_lib.base_config`)
  holds every default, and the diffusion process (`diffusion.from_config(config)`) the
  formulation, schedule, prediction and variance type. `dataclasses.replace` changes a field.

  Attributes:
    process: the diffusion process the network was trained with, `EDM` (image DiffiT) or
      `ADM` (discrete ADM/IDDPM; latent DiffiT).
    name: "ddpm", "ddim", "heun", "euler" or "dpmpp_2m" (EDM: the last three).
    num_steps: sampling steps N (ADM: respaced chain length unless `respacing` is set).
    respacing: ADM `space_timesteps` string ("250", "ddim50", "10,15,20"); "" = str(num_steps).
    clip_denoised: clip ADM's x_0 prediction to [-1, 1] (False for latents, as DiffiT).
    eta: DDIM noise scale (0 = deterministic).
    sigma_min, sigma_max, rho: EDM discretization [EDM Eq. 5].
    s_churn, s_tmin, s_tmax, s_noise: EDM Alg. 2 stochasticity (EDM heun/euler only).
    guidance_scale: classifier-free guidance w (1 = off).
    guidance_schedule: "constant" or "power_cosine" (ADM only).
    guidance_power: power-cosine exponent.
    guidance_channels: guide the first k output channels (3 = DiffiT's official); None = all
      prediction channels (variance channels are never guided).
    guidance_interval: (lo, hi): guide only where lo < sigma <= hi; None = always.
    num_classes: number of classes (the null label); None for an unconditional model.
  """
  process: Diffusion
  name: str
  num_steps: int
  respacing: str
  clip_denoised: bool
  eta: float
  sigma_min: float
  sigma_max: float
  rho: float
  s_churn: float
  s_tmin: float
  s_tmax: float
  s_noise: float
  guidance_scale: float
  guidance_schedule: str
  guidance_power: float
  guidance_channels: int | None
  guidance_interval: tuple[float, float] | None
  num_classes: int | None

  @classmethod
  def from_config(cls, config: Any, *, num_steps: int | None = None) -> "SamplerConfig":
    """The sampler `config.sampler` describes for the config's process and network.

    The configs in `configs/` hold the paper's and the release's settings (e.g.
    `imagenet256_latent.py`: 250 DDPM steps, power-cosine guidance 4.4 on 3 channels).

    Args:
      config: a run config (`config_lib.base_config` declares every field read here).
      num_steps: overrides `config.sampler.num_steps` and, for ADM, its `respacing` (the
        trainer's quick grids).

    `config.sampler.guidance.channels = 0` guides every prediction channel;
    `config.sampler.respacing` (ADM only: "250", "ddim25", "10,15,20") replaces num_steps.
    """
    s, g = config.sampler, config.sampler.guidance
    process = diffusion_process.from_config(config)
    adm = process.name == "adm"
    return cls(
        process=process, name=s.name, num_steps=int(num_steps or s.num_steps),
        respacing="" if num_steps and adm else s.respacing,
        clip_denoised=bool(s.clip_denoised), eta=float(s.eta), sigma_min=float(s.sigma_min),
        sigma_max=float(s.sigma_max), rho=float(s.rho), s_churn=float(s.churn),
        s_tmin=float(s.churn_tmin), s_tmax=float(s.churn_tmax) or float("inf"),
        s_noise=float(s.churn_noise), guidance_scale=float(g.scale),
        guidance_schedule=g.schedule, guidance_power=float(g.power),
        guidance_channels=int(g.channels) or None,
        guidance_interval=tuple(float(v) for v in g.interval) or None,
        num_classes=int(config.model.num_classes) or None)

  @property
  def formulation(self) -> str:
    """"adm" or "edm", the process's."""
    return self.process.name

  @property
  def guidance(self) -> Guidance:
    return Guidance(
        scale=float(self.guidance_scale), schedule=self.guidance_schedule,
        power=float(self.guidance_power), channels=self.guidance_channels,
        interval=self.guidance_interval,
        null_class=self.num_classes if self.num_classes is not None else -1,
        num_timesteps=self.process.num_timesteps if self.formulation == "adm" else 0)

  @property
  def steps(self) -> int:
    """Sampling steps actually taken (an ADM `respacing` string fixes its own count)."""
    if self.formulation == "adm" and self.respacing:
      return len(space_timesteps(self.process.num_timesteps, self.respacing))
    return self.num_steps

  @property
  def nfe(self) -> int:
    """Batched network evaluations per sample (a guided one costs a doubled batch)."""
    return 2 * self.steps - 1 if self.name == "heun" else self.steps


def validate(cfg: SamplerConfig, shape: tuple[int, ...]) -> None:
  """Raises a ValueError naming the bad setting and the fix."""
  allowed = ADM_SAMPLERS if cfg.formulation == "adm" else EDM_SAMPLERS
  if cfg.name not in allowed:
    hint = (" ('ddpm' and 'ddim' need the discrete ADM formulation)"
            if cfg.name in ADM_SAMPLERS else "")
    raise ValueError(f"Unknown sampler {cfg.name!r} for formulation {cfg.formulation!r}; "
                     f"choose one of {allowed}{hint}.")
  if cfg.num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {cfg.num_steps}.")
  if cfg.respacing:
    if cfg.formulation != "adm":
      raise ValueError(f"respacing={cfg.respacing!r} picks timesteps of a discrete ADM chain; "
                       "an EDM model samples on its own sigma grid: set num_steps instead.")
    space_timesteps(cfg.process.num_timesteps, cfg.respacing)  # a bad string says what is wrong
  if cfg.eta < 0:
    raise ValueError(f"eta must be >= 0, got {cfg.eta}.")
  if cfg.s_churn < 0:
    raise ValueError(f"s_churn must be >= 0, got {cfg.s_churn}.")
  if cfg.s_churn > 0 and (cfg.formulation == "adm" or cfg.name == "dpmpp_2m"):
    raise ValueError("s_churn > 0 (EDM Alg. 2) needs a continuous-sigma EDM model with the heun "
                     "or euler sampler; for a stochastic ADM sampler use name='ddpm' or "
                     "'ddim' with eta > 0.")
  if len(shape) != 3:
    raise ValueError(f"shape must be (H, W, C) without the batch, got {shape}.")
  g = cfg.guidance
  if g.active:
    if cfg.num_classes is None:
      raise ValueError("Classifier-free guidance needs a class-conditional model: set "
                       "num_classes, or guidance_scale=1 for an unconditional model.")
    if g.schedule not in ("constant", "power_cosine"):
      raise ValueError(f"Unknown guidance_schedule {g.schedule!r}; use 'constant' or "
                       "'power_cosine'.")
    if g.schedule == "power_cosine" and cfg.formulation != "adm":
      raise ValueError("The power-cosine guidance schedule is defined on ADM timesteps; with "
                       "formulation='edm' use guidance_schedule='constant' (optionally with "
                       "guidance_interval).")
    if g.interval is not None and not (len(g.interval) == 2 and g.interval[0] < g.interval[1]):
      raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with lo < hi, got "
                       f"{g.interval}.")
    if g.channels is not None and not 1 <= g.channels <= shape[-1]:
      raise ValueError(f"guidance_channels={g.channels} must be in [1, {shape[-1]}] for "
                       f"{shape[-1]}-channel samples, or None for all channels.")


def batch_spec(mesh: Mesh) -> P:
  """The batch axis split over the mesh's batch axes ("data", and "fsdp" when present)."""
  axes = tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.shape)
  return P(axes[0] if len(axes) == 1 else axes)


def _constrain(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Keeps x's batch axis sharded over the batch axes (Auto or Explicit mesh axes)."""
  sharding = NamedSharding(mesh, batch_spec(mesh))
  if mesh.axis_types and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def initial_noise(seed: int, sample_indices: Any, shape: tuple[int, ...]) -> jax.Array:
  """The standard-normal noise a sampler starts from when no `x_T` is given, (B, *shape).

  Sample i's is normal(fold_in(fold_in(key(seed), sample_indices[i]), 0)); the sampler
  scales it to its first noise level (x_T itself for ADM, sigma_max x_T for EDM).
  """
  base = jax.random.key(seed)
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, i), 0),
                                     tuple(shape), jnp.float32)
  return jax.vmap(draw)(jnp.asarray(sample_indices, jnp.int32))                  # (B, H, W, C)


# ----------------------------------------------------------------------------------------------
# Single steps of the ADM samplers (public for parity tests against diffusers).
# ----------------------------------------------------------------------------------------------


def ddpm_step(schedule: GaussianSchedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
              noise: jax.Array, *, pred_type: str = "eps", var_type: str = "learned_range",
              clip_denoised: bool = False) -> tuple[jax.Array, jax.Array]:
  """One ancestral step x_t -> x_{t-1} ~ N(mu_theta, Sigma_theta) [DDPM Alg. 2, IDDPM Eq. 15].

  Args:
    schedule: the (respaced) diffusion.
    model_output: the model's output at (x, t).
    x: (B, H, W, C) current sample.
    t: respaced step index (scalar or (B,)); no noise is added at t = 0.
    noise: standard normal noise of x's shape.
    pred_type, var_type, clip_denoised: as in `p_mean_variance`.

  Returns:
    (x_{t-1}, x_0 prediction).
  """
  out = p_mean_variance(schedule, model_output, x, t, pred_type=pred_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  nonzero = _nonzero_mask(t, x)
  return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_x0


def _nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
  """1 where t > 0 else 0 (no noise is added on the last step), broadcastable to x."""
  return per_example((jnp.asarray(t) > 0).astype(x.dtype), x)


def ddim_step(schedule: GaussianSchedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
              noise: jax.Array | None, *, eta: float = 0.0, pred_type: str = "eps",
              var_type: str = "learned_range", clip_denoised: bool = False
              ) -> tuple[jax.Array, jax.Array]:
  """One DDIM step [DDIM Eq. 12] with sigma_t(eta) [DDIM Eq. 16], as ADM's `ddim_sample`.

  x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t z.

  Args:
    schedule: the (respaced) diffusion.
    model_output: the model's output at (x, t).
    x: (B, H, W, C) current sample.
    t: respaced step index (scalar or (B,)); no noise is added at t = 0.
    noise: standard normal noise of x's shape (unused, may be None, when eta = 0).
    eta: 0 for the deterministic DDIM, 1 for DDPM-like variance.
    pred_type, var_type, clip_denoised: as in `p_mean_variance`.

  Returns:
    (x_{t-1}, x_0 prediction).
  """
  out = p_mean_variance(schedule, model_output, x, t, pred_type=pred_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  eps = predict_eps_from_x0(schedule, x, t, out.pred_x0)
  alpha_bar = extract(schedule.alphas_cumprod, t, x)
  alpha_bar_prev = extract(schedule.alphas_cumprod_prev, t, x)
  sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
           * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
  x_prev = (out.pred_x0 * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
  if eta > 0:
    x_prev = x_prev + _nonzero_mask(t, x) * sigma * noise
  return x_prev, out.pred_x0


# ----------------------------------------------------------------------------------------------
# The sampler loops. Each takes (params, y, x_T, normal): x_T the standard-normal initial
# noise, normal(step) -> per-sample noise of step >= 1.
# ----------------------------------------------------------------------------------------------


def _network(apply_fn: ApplyFn, guidance: Guidance, prediction_channels: int):
  """net(params, x, t_in, y, w) -> output; one doubled-batch forward when guidance is on."""
  def net(params, x, t_in, y, w):
    t_in = jnp.broadcast_to(t_in, x.shape[:1])
    if guidance.active:
      return cfg_forward(apply_fn, params, x, t_in, y, w, channels=guidance.channels,
                         null_class=guidance.null_class,
                         prediction_channels=prediction_channels)
    return apply_fn(params, x, t_in, y).astype(jnp.float32)
  return net


def _adm_loops(cfg: SamplerConfig, apply_fn: ApplyFn, shape: tuple[int, ...]):
  """The ADM model as (schedule, model_out(params, x_t, t, y), denoise, sigmas, init scale)."""
  process = cfg.process
  schedule = process.respaced(cfg.respacing or str(cfg.num_steps))
  steps = schedule.num_timesteps
  guidance = cfg.guidance
  net = _network(apply_fn, guidance, shape[-1])
  sigmas_kept = process.sigmas(schedule.timestep_map)                     # (N,) increasing

  def model_out(params, x_t, t, y):
    """Model output at respaced step t (a traced scalar), guided."""
    t_orig = schedule.timestep_map[t]
    w = None
    if guidance.active:
      w = guidance_weight(guidance, t=t_orig, sigma=jnp.asarray(sigmas_kept, jnp.float32)[t])
    return net(params, x_t, t_orig, y, w)

  def denoise(params, x_ve, i, sigma, y):
    """D(x_ve; sigma_i) at ODE grid point i (respaced step N-1-i); sigma is implied by i."""
    del sigma
    t = steps - 1 - i
    x_t = x_ve * schedule.sqrt_alphas_cumprod[t]
    out = model_out(params, x_t, t, y)
    return p_mean_variance(schedule, out, x_t, t, pred_type=process.pred_type,
                           var_type=process.var_type, clip_denoised=cfg.clip_denoised).pred_x0

  sigmas = np.append(sigmas_kept[::-1], 0.0)                              # (N+1,) decreasing
  init_scale = float(np.sqrt(1.0 + sigmas[0] ** 2))  # x_T ~ N(0, I) is x_ve ~ N(0, 1+sigma^2)
  return schedule, model_out, denoise, sigmas, init_scale


def _edm_loops(cfg: SamplerConfig, apply_fn: ApplyFn, shape: tuple[int, ...]):
  """The EDM model as (denoise, sigmas, init scale)."""
  guidance = cfg.guidance
  net = _network(apply_fn, guidance, shape[-1])

  def denoise(params, x, i, sigma, y):
    del i
    w = guidance_weight(guidance, sigma=sigma) if guidance.active else None
    net_fn = lambda x_in, c_noise, yy: net(params, x_in, c_noise, yy, w)
    return edm_lib.edm_denoise(net_fn, x, sigma, y, sigma_data=cfg.process.sigma_data)

  sigmas = edm_lib.karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
  return denoise, sigmas, float(sigmas[0])


def _ve_sampler(cfg: SamplerConfig, denoise, sigmas: np.ndarray, init_scale: float):
  """Heun / Euler / DPM-Solver++(2M) on the VE grid `sigmas` (N+1,), ending at 0."""
  steps = len(sigmas) - 1
  sig = jnp.asarray(sigmas, jnp.float32)                                  # (N+1,)
  # EDM Alg. 2 churn: gamma_i = min(S_churn / N, sqrt(2) - 1) on S_tmin <= sigma_i <= S_tmax.
  in_range = (sigmas[:-1] >= cfg.s_tmin) & (sigmas[:-1] <= cfg.s_tmax)
  gammas = np.where(in_range, min(cfg.s_churn / steps, np.sqrt(2) - 1), 0.0)    # (N,)
  # sqrt(sigma_hat^2 - sigma_i^2) in float64: in float32 it can round below 0 when gamma = 0.
  churn_std = jnp.asarray(sigmas[:-1] * np.sqrt((1 + gammas) ** 2 - 1), jnp.float32)
  gammas = jnp.asarray(gammas, jnp.float32)
  churn = cfg.s_churn > 0

  def run_heun_euler(params, y, x_T, normal):
    heun = cfg.name == "heun"

    def body(i, x):
      s_cur, s_next = sig[i], sig[i + 1]
      # 1. Raise the noise to sigma_hat = (1 + gamma_i) sigma_i [EDM Alg. 2, lines 4-6].
      s_hat = s_cur * (1 + gammas[i])
      if churn:
        x = x + churn_std[i] * cfg.s_noise * normal(i + 1)
      # 2. Euler step dx/dsigma = (x - D(x; sigma)) / sigma [EDM Alg. 1, lines 4-5].
      d = (x - denoise(params, x, i, s_hat, y)) / s_hat
      x_next = x + (s_next - s_hat) * d
      if not heun:
        return x_next

      # 3. Second-order correction unless sigma_{i+1} = 0 [EDM Alg. 1, lines 6-8].
      def correct(x_next):
        d_next = (x_next - denoise(params, x_next, i + 1, s_next, y)) / s_next
        return x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
      return jax.lax.cond(i < steps - 1, correct, lambda z: z, x_next)

    x = x_T * init_scale
    return jax.lax.fori_loop(0, steps, body, x)

  # DPM-Solver++(2M) in log-sigma time lambda = -log sigma (k-diffusion `sample_dpmpp_2m`):
  # x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D_i', with the multistep
  # D_i' = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}, r_i = h_{i-1} / h_i; first order at the
  # first step and at the last (sigma_N = 0), where the update is x = D.
  with np.errstate(divide="ignore"):
    log_sig = np.log(sigmas)                                              # (N+1,), -inf last
  h = log_sig[:-1] - log_sig[1:]                                          # (N,) inf last
  ratio = sigmas[1:] / sigmas[:-1]                                        # (N,) 0 last
  gain = -np.expm1(-h)                                                    # (N,) 1 last
  half_inv_r = np.zeros(steps)
  if steps > 2:
    half_inv_r[1:-1] = h[1:-1] / (2 * h[:-2])
  ratio_j, gain_j, c_j = (jnp.asarray(a, jnp.float32) for a in (ratio, gain, half_inv_r))

  def run_dpmpp_2m(params, y, x_T, normal):
    def body(i, carry):
      x, old_denoised = carry
      denoised = denoise(params, x, i, sig[i], y)
      denoised_d = (1 + c_j[i]) * denoised - c_j[i] * old_denoised
      return ratio_j[i] * x + gain_j[i] * denoised_d, denoised

    x = x_T * init_scale
    x, _ = jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))
    return x

  return run_dpmpp_2m if cfg.name == "dpmpp_2m" else run_heun_euler


def _adm_chain_sampler(cfg: SamplerConfig, schedule: GaussianSchedule, model_out):
  """Ancestral DDPM or DDIM over the respaced chain t = N-1, ..., 0."""
  steps = schedule.num_timesteps
  kwargs = dict(pred_type=cfg.process.pred_type, var_type=cfg.process.var_type,
                clip_denoised=cfg.clip_denoised)

  def run(params, y, x_T, normal):
    def body(i, x):
      t = steps - 1 - i
      out = model_out(params, x, t, y)
      if cfg.name == "ddpm":
        x, _ = ddpm_step(schedule, out, x, t, normal(i + 1), **kwargs)
      else:
        noise = normal(i + 1) if cfg.eta > 0 else None
        x, _ = ddim_step(schedule, out, x, t, noise, eta=cfg.eta, **kwargs)
      return x

    return jax.lax.fori_loop(0, steps, body, x_T)
  return run


# ----------------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------------


class Sampler:
  """A compiled sampler: `sampler(params, labels, sample_indices, seed, x_T=None) -> (B, H, W, C)`.

  Attributes:
    config: the `SamplerConfig`.
    shape: (H, W, C) of one sample.
    mesh: the mesh whose batch axes ("data", "fsdp" when present) shard the batch.
    nfe: network evaluations per sample (guided ones run on a doubled batch).
    jitted: the underlying `jax.jit` function of (params, labels, sample_indices, seed, x_T);
      its batch must be a multiple of the batch axes' size (`__call__` pads for you).
  """

  def __init__(self, config: SamplerConfig, shape: tuple[int, ...], mesh: Mesh, jitted):
    self.config, self.shape, self.mesh, self.jitted = config, shape, mesh, jitted
    self.nfe = config.nfe

  def __call__(self, params: Any, labels: Any, sample_indices: Any, seed: int, *,
               x_T: Any = None) -> jax.Array:
    """Draws one batch of samples.

    Args:
      params: network parameters, placed on `mesh` (replicated or sharded).
      labels: (B,) int class labels, or None for an unconditional model.
      sample_indices: (B,) int global indices of the samples (e.g. arange(start, start + B));
        they, with the seed, fix each sample's noise.
      seed: integer seed.
      x_T: optional (B, H, W, C) standard-normal noise to start from instead of the seeded
        `initial_noise(seed, sample_indices, shape)`; the sampler scales it to its first
        noise level. The seed still draws the noise of stochastic steps (DDPM, eta > 0).

    NumPy labels and indices are placed with `device_put` (one process). With several
    processes, pass global `jax.Array`s built by `jax.make_array_from_process_local_data`.

    Returns:
      (B, H, W, C) float32 samples, batch sharded over the batch axes (replicated when B is
      not a multiple of their size).
    """
    indices = np.asarray(sample_indices, dtype=np.int32) if not isinstance(
        sample_indices, jax.Array) else sample_indices.astype(jnp.int32)
    if indices.ndim != 1:
      raise ValueError(f"sample_indices must be 1-D, got shape {indices.shape}.")
    batch = indices.shape[0]
    if labels is None and self.config.guidance.active:
      raise ValueError("Classifier-free guidance needs class labels; pass labels or set "
                       "guidance_scale=1.")
    if labels is not None:
      labels = labels.astype(jnp.int32) if isinstance(labels, jax.Array) else np.asarray(
          labels, dtype=np.int32)
      if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) like sample_indices, got "
                         f"{labels.shape}.")
    if x_T is not None:
      x_T = x_T.astype(jnp.float32) if isinstance(x_T, jax.Array) else np.asarray(
          x_T, np.float32)
      if x_T.shape != (batch, *self.shape):
        raise ValueError(f"x_T must have shape {(batch, *self.shape)} (batch, H, W, C), got "
                         f"{x_T.shape}.")
    # Pad to a multiple of the batch axes by repeating the last sample; dropped below.
    spec = batch_spec(self.mesh)
    pad = -batch % int(np.prod([self.mesh.shape[a] for a in jax.tree.leaves(tuple(spec))]))

    def padded(a):
      if a is None or not pad:
        return a
      xp = jnp if isinstance(a, jax.Array) else np
      return xp.concatenate([a, xp.repeat(a[-1:], pad, axis=0)])

    sharding = NamedSharding(self.mesh, spec)
    indices, labels, x_T = (None if a is None else jax.device_put(padded(a), sharding)
                            for a in (indices, labels, x_T))
    seed = jnp.asarray(np.uint32(seed & 0xFFFFFFFF) if isinstance(seed, int) else seed,
                       jnp.uint32)
    samples = self.jitted(params, labels, indices, seed, x_T)
    if pad:  # a ragged batch cannot stay evenly sharded: replicate, then drop the padding
      samples = jax.device_put(samples, NamedSharding(self.mesh, P()))[:batch]
    return samples


def make_sampler(config: SamplerConfig, apply_fn: ApplyFn, shape: tuple[int, int, int], *,
                 mesh: Mesh | None = None) -> Sampler:
  """Builds the compiled sampler a config describes.

  Args:
    config: the settings, `SamplerConfig.from_config(run_config)`.
    apply_fn: `apply_fn(params, x, t_in, y)`; see the module docstring for the contract.
    shape: (H, W, C) of one sample (C = prediction channels; 4 for SD latents).
    mesh: a mesh with a "data" axis (and optionally "fsdp"), e.g.
      `diffit_jax.sharding.create_mesh(config.mesh)`; by default data parallel over every
      device.

  Returns:
    A `Sampler`; call it as `sampler(params, labels, sample_indices, seed, x_T=None)`.
  """
  if not isinstance(config, SamplerConfig):
    raise TypeError(f"make_sampler takes a SamplerConfig (SamplerConfig.from_config(config) of a "
                    f"run config), got {type(config).__name__}.")
  cfg = config
  shape = tuple(int(s) for s in shape)
  validate(cfg, shape)
  if mesh is None:
    mesh = sharding_lib.create_mesh()
  if sharding_lib.DATA_AXIS not in mesh.shape:
    raise ValueError(f"The mesh needs a {sharding_lib.DATA_AXIS!r} axis, got axes "
                     f"{tuple(mesh.shape)}.")

  if cfg.formulation == "adm":
    schedule, model_out, denoise, sigmas, init_scale = _adm_loops(cfg, apply_fn, shape)
    if cfg.name in ("ddpm", "ddim"):
      run = _adm_chain_sampler(cfg, schedule, model_out)
    else:
      run = _ve_sampler(cfg, denoise, sigmas, init_scale)
  else:
    denoise, sigmas, init_scale = _edm_loops(cfg, apply_fn, shape)
    run = _ve_sampler(cfg, denoise, sigmas, init_scale)

  def sample(params, labels, sample_indices, seed, x_T):
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(sample_indices)  # (B,) keys

    def normal(step):
      draw = lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, jnp.float32)
      return _constrain(jax.vmap(draw)(keys), mesh)                         # (B, H, W, C)

    x_T = normal(0) if x_T is None else _constrain(x_T, mesh)
    return _constrain(run(params, labels, x_T, normal), mesh)

  jitted = jax.jit(sample, out_shardings=NamedSharding(mesh, batch_spec(mesh)))
  return Sampler(cfg, shape, mesh, jitted)
