"""Diffusion processes, losses and samplers as pure functions on arrays (no networks).

`from_config(config)` (in `process`) is the one entry point from a run config: the EDM or
ADM process with its schedule, variance type, training noise levels and per-example loss.
`gaussian` (ADM/IDDPM, the latent DiffiT models), `respace` (ADM timestep respacing), `edm`
(Karras et al. 2022, the image-space models), `guidance` (classifier-free guidance as DiffiT
applies it) and `samplers` (compiled, sharded sampling loops).
"""

from diffit_jax.diffusion.edm import (edm_denoise, edm_loss, edm_loss_weight, edm_precond,
                                      karras_sigmas, sample_training_sigmas)
from diffit_jax.diffusion.gaussian import (GaussianSchedule, PMeanVariance, adm_loss,
                                           discretized_gaussian_log_likelihood,
                                           get_named_beta_schedule, mean_flat, normal_kl,
                                           p_mean_variance, predict_eps_from_x0,
                                           predict_x0_from_eps, predict_x0_from_v, q_sample,
                                           q_posterior_mean_variance, sample_timesteps,
                                           schedule_from_betas, vb_terms_bpd)
from diffit_jax.diffusion.guidance import (Guidance, cfg_forward, combine_cfg, guidance_weight,
                                           power_cosine_weight)
from diffit_jax.diffusion.process import ADM, EDM, Diffusion, from_config
from diffit_jax.diffusion.respace import create_schedule, respace_betas, space_timesteps
from diffit_jax.diffusion.guidance import forward_with_cfg
from diffit_jax.diffusion.samplers import (Sampler, SamplerConfig, ddim_step, ddpm_step,
                                           initial_noise, make_sampler)

__all__ = [
    "ADM", "EDM", "Diffusion", "GaussianSchedule", "Guidance", "PMeanVariance", "Sampler",
    "SamplerConfig", "adm_loss", "cfg_forward", "combine_cfg", "create_schedule", "ddim_step",
    "ddpm_step", "discretized_gaussian_log_likelihood", "edm_denoise", "edm_loss",
    "edm_loss_weight", "edm_precond", "forward_with_cfg", "from_config",
    "get_named_beta_schedule", "guidance_weight", "initial_noise", "karras_sigmas",
    "make_sampler", "mean_flat", "normal_kl", "p_mean_variance", "power_cosine_weight",
    "predict_eps_from_x0", "predict_x0_from_eps", "predict_x0_from_v",
    "q_posterior_mean_variance", "q_sample", "respace_betas", "sample_timesteps",
    "sample_training_sigmas", "schedule_from_betas", "space_timesteps", "vb_terms_bpd",
]
