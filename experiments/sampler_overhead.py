"""How long one compiled sampler call spends outside the network (the loop overhead).

For each sampler we time, on the same batch and device(s):
  * full:     the compiled sampler with a tiny DiT-like network (Flax NNX, via `nnx_apply_fn`);
  * network:  the network alone, NFE forwards in one jitted `fori_loop` on the batch the
              sampler feeds it (doubled under guidance);
  * trivial:  the same compiled sampler with a network that costs nothing (x -> a x), i.e.
              the loop, RNG and update arithmetic alone.
overhead = full - network, reported in ms per call and per step and as a fraction of the
call. Times are minima over REPEATS interleaved rounds (the least disturbed by other processes
on a shared machine). The benchmark's sampler part (`bench_sampler.py`) measures the same way
on the latent DiffiT and provides the trivial network and the network-only loop.
Writes experiments/results/sampler_overhead.json.

Run from the repository root: .venv/bin/python experiments/sampler_overhead.py
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffit_jax import models
from diffit_jax.config_lib import load_config
from diffit_jax.diffusion import samplers

from bench_common import (RESULTS_DIR, local_runners, machine_info, time_interleaved,
                          write_json)
from bench_sampler import edm_heun, network_only_loop, trivial_network

RESULTS = os.path.join(RESULTS_DIR, "sampler_overhead.json")
LATENT = (16, 16, 4)   # (H, W, C): a 128 px SD latent
BATCH = 16
REPEATS = 7

NUM_CLASSES = 10


def adm(name: str, num_steps: int, guided: bool = False) -> samplers.SamplerConfig:
  """The released ImageNet-256 sampler settings (`configs/imagenet256_latent.py`) with
  another sampler and step count, for a 10-class network; its guidance only if `guided`."""
  released = samplers.SamplerConfig.from_config(load_config("imagenet256_latent"))
  return dataclasses.replace(released, name=name, num_steps=num_steps, num_classes=NUM_CLASSES,
                             guidance_scale=released.guidance_scale if guided else 1.0)


SAMPLERS = {
    # The official ImageNet-256 recipe, 50 instead of 250 steps to keep the run short.
    "ddpm_50_cfg_power_cosine": adm("ddpm", 50, guided=True),
    "ddpm_50": adm("ddpm", 50),
    "ddim_50": adm("ddim", 50),
    "dpmpp_2m_20_adm": adm("dpmpp_2m", 20),
    "edm_heun_18": edm_heun(18, NUM_CLASSES),
}


class TinyDiT(nnx.Module):
  """A 4-block DiT-style network: patch 2, width 192, time+label token added to every token."""

  def __init__(self, channels: int, out_channels: int, *, hidden: int = 192, depth: int = 4,
               heads: int = 4, num_classes: int = 10, rngs: nnx.Rngs):
    self.patch = nnx.Conv(channels, hidden, (2, 2), strides=(2, 2), rngs=rngs)
    self.t_mlp = nnx.Linear(64, hidden, rngs=rngs)
    self.y_embed = nnx.Embed(num_classes + 1, hidden, rngs=rngs)
    self.attn = nnx.List([nnx.MultiHeadAttention(heads, hidden, decode=False, rngs=rngs)
                          for _ in range(depth)])
    self.mlp = nnx.List([nnx.Sequential(nnx.Linear(hidden, 4 * hidden, rngs=rngs), nnx.gelu,
                                        nnx.Linear(4 * hidden, hidden, rngs=rngs))
                         for _ in range(depth)])
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 4 * out_channels, rngs=rngs)
    self.out_channels = out_channels

  def __call__(self, x, t, y):
    b, h, w, _ = x.shape
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(32) / 32)
    args = t.astype(jnp.float32)[:, None] * freqs[None]                    # (B, 32)
    c = self.t_mlp(jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)) + self.y_embed(y)
    z = self.patch(x).reshape(b, (h // 2) * (w // 2), -1) + c[:, None]     # (B, N, D)
    for attn, mlp in zip(self.attn, self.mlp):
      z = z + attn(self.norm(z))
      z = z + mlp(self.norm(z))
    z = self.out(self.norm(z))                                             # (B, N, 4 * K)
    z = z.reshape(b, h // 2, w // 2, 2, 2, self.out_channels)              # (B, h, w, p, p, K)
    return z.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, self.out_channels)  # (B, H, W, K)


def timed(*calls) -> list[float]:
  """Minimum wall time in ms of each (fn, args) over REPEATS rounds, after a compiling call.

  The calls alternate within each round, so load from other processes hits them alike.
  """
  runs = {i: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
          for i, (fn, args) in enumerate(calls)}
  for run in runs.values():
    run()
  times, _ = time_interleaved(local_runners(runs), REPEATS, 1)
  return [1e3 * times[i]["min_s"] for i in runs]


def main() -> None:
  load_before = os.getloadavg()
  labels = np.arange(BATCH) % NUM_CLASSES
  indices = np.arange(BATCH)
  results = {}
  for key, config in SAMPLERS.items():
    adm = config.formulation == "adm"
    out_channels = 2 * LATENT[-1] if adm else LATENT[-1]
    apply_fn, state = models.nnx_apply_fn(
        TinyDiT(LATENT[-1], out_channels, rngs=nnx.Rngs(0)))
    sampler = samplers.make_sampler(config, apply_fn, LATENT)
    trivial = samplers.make_sampler(config, trivial_network(adm), LATENT)
    (trivial_ms,) = timed((trivial, (state, labels, indices, 0)))

    net_batch = 2 * BATCH if config.guidance.active else BATCH
    x = jnp.ones((net_batch,) + LATENT)
    t = jnp.full((net_batch,), 500, jnp.int32 if adm else jnp.float32)
    y = jnp.zeros((net_batch,), jnp.int32)
    network_only = network_only_loop(apply_fn, config.nfe, LATENT[-1])
    full_ms, net_ms = timed((sampler, (state, labels, indices, 0)),
                            (network_only, (state, x, t, y)))

    steps = config.steps
    overhead_ms = full_ms - net_ms
    results[key] = dict(
        steps=steps, nfe=config.nfe, network_batch=net_batch,
        full_ms=round(full_ms, 2), network_only_ms=round(net_ms, 2),
        overhead_ms=round(overhead_ms, 2),
        overhead_fraction=round(overhead_ms / full_ms, 3),
        overhead_per_step_ms=round(overhead_ms / steps, 3),
        trivial_network_sampler_ms=round(trivial_ms, 2),
        trivial_per_step_ms=round(trivial_ms / steps, 3))
    print(key, results[key], flush=True)

  machine = machine_info()
  report = dict(
      description=("Time of one compiled sampler call outside the network: overhead = full "
                   "call - the network alone run NFE times in one jitted loop; trivial = the "
                   "same sampler with a zero-cost network. Minima of %d runs." % REPEATS),
      device=machine["device_kind"], platform=machine["platform"],
      num_devices=machine["num_devices"], host=machine["host"], cpu_count=machine["cpu_count"],
      jax_version=machine["jax"], latent_shape=LATENT, batch=BATCH,
      # On a shared CPU, full - network is only as good as the run-to-run noise (compare the
      # load averages with cpu_count); the trivial-network column is the robust measure.
      load_average_1min_before_after=(round(load_before[0], 2), round(os.getloadavg()[0], 2)),
      network="TinyDiT: patch 2, width 192, depth 4, 4 heads (64 tokens)",
      results=results)
  os.makedirs(RESULTS_DIR, exist_ok=True)
  write_json(RESULTS, report)
  print("wrote", RESULTS)


if __name__ == "__main__":
  main()
