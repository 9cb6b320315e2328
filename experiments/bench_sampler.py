"""The sampler: seconds per image, and the share of each call spent outside the network.

For the official ImageNet-256 recipe (250-step DDPM with power-cosine guidance,
`official_ddpm`) and 18-step EDM Heun (35 NFE; the EDM formulation run on the latent
network, whose cost per call is the same), three compiled programs are timed in the same
rounds: the sampler; the network alone, run NFE times in one jitted loop
(`network_only_loop`); and the sampler with a network that costs nothing
(`trivial_network`), i.e. the loop, RNG and update arithmetic alone. Fewer steps than the
official ones may be run; the time is then scaled linearly in NFE.
`sampler_overhead.py` measures the same way on a small DiT-like network.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffit_jax import models, sharding
from diffit_jax.diffusion import samplers

from bench_common import PeakMemory, load_average, local_runners, time_interleaved
from bench_jax import jax_train_config, latent_shape

OFFICIAL_DDPM_STEPS, OFFICIAL_HEUN_STEPS = 250, 18


def official_ddpm(num_steps: int, num_classes: int) -> samplers.SamplerConfig:
  """The released ImageNet-256 sampler as the shipped config has it (DDPM, power-cosine
  guidance w = 4.4 with exponent 4 on 3 channels), with `num_steps` steps (250 in the
  release) for a network of `num_classes` classes."""
  from diffit_jax.config_lib import load_config  # pylint: disable=g-import-not-at-top
  released = samplers.SamplerConfig.from_config(load_config("imagenet256_latent"))
  return dataclasses.replace(released, num_steps=num_steps, num_classes=num_classes)


def edm_heun(num_steps: int, num_classes: int) -> samplers.SamplerConfig:
  """EDM's Heun sampler [EDM Alg. 1] with the schema's EDM settings (no guidance, no churn)
  and `num_steps` steps (18 in EDM) for a network of `num_classes` classes."""
  from diffit_jax.config_lib import base_config  # pylint: disable=g-import-not-at-top
  config = base_config("latent")
  config.diffusion.name, config.sampler.name = "edm", "heun"
  config.sampler.guidance.scale = 1.0
  config.model.num_classes = num_classes
  return samplers.SamplerConfig.from_config(config, num_steps=num_steps)


def trivial_network(adm: bool) -> samplers.ApplyFn:
  """A network that costs nothing (x -> x / 2): a sampler built on it is the loop alone.

  With `adm`, zero learned-variance channels follow the prediction.
  """
  def apply_fn(params, x, t, y):
    del params, t, y
    eps = 0.5 * x
    return jnp.concatenate([eps, jnp.zeros_like(eps)], -1) if adm else eps
  return apply_fn


def network_only_loop(apply_fn: samplers.ApplyFn, nfe: int, channels: int) -> Callable:
  """`apply_fn` run `nfe` times in one jitted loop: (params, x, t, y) -> x.

  Each forward depends on the previous one, as in the sampler, so none can be skipped.
  """
  @jax.jit
  def loop(params, x, t, y):
    def body(_, x):
      return 0.5 * x + 0.5 * apply_fn(params, x, t, y)[..., :channels]
    return jax.lax.fori_loop(0, nfe, body, x)
  return loop


def benchmark_sampler(args: argparse.Namespace, mesh) -> dict:
  """DDPM-250 with guidance and EDM Heun-18 on a latent DiffiT, scaled down where asked."""
  config = jax_train_config(args.sampler_variant, args).model
  model = models.build_model(config, rngs=nnx.Rngs(0))
  apply_fn, state = models.nnx_apply_fn(model)
  shape = latent_shape(args)
  c = shape[-1]
  b = args.sampler_batch
  rng = np.random.default_rng(0)
  data = sharding.batch_sharding(mesh)
  labels = jax.device_put(rng.integers(0, config.num_classes, b).astype(np.int32), data)
  indices = jax.device_put(np.arange(b, dtype=np.int32), data)
  seed = jnp.uint32(0)
  settings = {
      "ddpm_250_guided": (official_ddpm(args.ddpm_steps, config.num_classes),
                          OFFICIAL_DDPM_STEPS),
      # EDM's Heun sampler [EDM Alg. 1]; the latent network takes c_noise as its time input,
      # which costs the same as a timestep index.
      "edm_heun_18": (edm_heun(args.heun_steps, config.num_classes), OFFICIAL_HEUN_STEPS),
  }
  result: dict[str, Any] = dict(variant=args.sampler_variant, batch_size=b,
                                load_average_start=load_average())
  for key, (cfg, official_steps) in settings.items():
    adm = cfg.formulation == "adm"
    # The EDM formulation reads the eps channels only (no learned variance).
    net_fn = apply_fn if adm else (lambda p, x, t, y: apply_fn(p, x, t, y)[..., :c])
    sampler = samplers.make_sampler(cfg, net_fn, shape, mesh=mesh)
    start = time.perf_counter()
    compiled = sampler.jitted.lower(state, labels, indices, seed, None).compile()  # no x_T
    compile_s = time.perf_counter() - start

    trivial = samplers.make_sampler(cfg, trivial_network(adm), shape, mesh=mesh).jitted.lower(
        state, labels, indices, seed, None).compile()

    net_batch = 2 * b if cfg.guidance.active else b
    x = jax.device_put(np.ones((net_batch,) + shape, np.float32), data)
    t = jax.device_put(np.full((net_batch,), 500, np.int32 if adm else np.float32), data)
    y = jax.device_put(np.zeros((net_batch,), np.int32), data)
    network = network_only_loop(net_fn, cfg.nfe, c).lower(state, x, t, y).compile()

    runners = {
        "full": lambda: jax.block_until_ready(compiled(state, labels, indices, seed, None)),
        "network_only": lambda: jax.block_until_ready(network(state, x, t, y)),
        "trivial_network": lambda: jax.block_until_ready(trivial(state, labels, indices, seed, None)),
    }
    with PeakMemory() as mem:
      for run in runners.values():
        run()
    print(f"[sampler {key}] timing {cfg.steps} steps ({cfg.nfe} NFE) x {args.sampler_repeats} "
          "rounds",
          flush=True)
    times, loads = time_interleaved(local_runners(runners), args.sampler_repeats, 1)
    full, net, triv = (times[k]["median_s"] for k in ("full", "network_only", "trivial_network"))
    # The rounds interleave the calls, so round i's full and network-only times saw the
    # same load: the median of per-round differences is steadier than a difference of medians.
    per_round = [(f - n) / f for f, n in zip(times["full"]["samples_s"],
                                              times["network_only"]["samples_s"])]
    official_nfe = (2 * official_steps - 1) if cfg.name == "heun" else official_steps
    scale = official_nfe / cfg.nfe
    result[key] = dict(
        measured_steps=cfg.steps, measured_nfe=cfg.nfe, official_steps=official_steps,
        official_nfe=official_nfe, extrapolated=scale != 1.0, network_batch=net_batch,
        compile_s=round(compile_s, 3), times=times, load_average_per_round=loads,
        seconds_per_image=full * scale / b,
        network_seconds_per_image=net * scale / b,
        # Two estimates of the share outside the network: the difference of two timings
        # (noisy on a shared CPU) and the zero-cost-network sampler (robust).
        overhead_fraction=statistics.median(per_round),
        overhead_fraction_per_round=[round(x, 4) for x in per_round],
        overhead_fraction_trivial_network=triv / full,
        memory=mem.result)
    print(f"[sampler {key}] {result[key]['seconds_per_image']:.3f} s/image, overhead "
          f"{result[key]['overhead_fraction']:.3f} (difference), "
          f"{result[key]['overhead_fraction_trivial_network']:.4f} (trivial network)",
          flush=True)
  result["load_average_end"] = load_average()
  return result


