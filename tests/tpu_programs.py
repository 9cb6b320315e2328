"""Compiles tiny variants of every jitted program for a TPU slice; one JSON line per program.

`python tests/tpu_programs.py SLICE GROUP` (GROUP "train", "inference" or "fid"), run by
tests/test_tpu.py in processes of their own, side by side: libtpu is loaded only there.
"""

import json
import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")  # JAX runs on the CPU; the TPU is only compiled for

from diffit_jax import config_lib, plan, sharding, tpu  # noqa: E402
from diffit_jax.models.vae import VAEConfig  # noqa: E402
from helpers import REPO, TINY_LATENT_MODEL, TINY_MODEL  # noqa: E402

TINY_LATENT = dict(TINY_LATENT_MODEL, num_classes=10)
TINY_VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


def config(name: str, model: dict, **fields):
  """configs/NAME.py:runlocal with a tiny `model`, batch 16 and the dotted `fields`."""
  c = config_lib.load_config(os.path.join(REPO, "configs", name + ".py:runlocal"))
  c.model.update(model)
  return plan.with_fields(c, {"batch_size": 16, **fields})


def image(**fields):
  return config("mnist_demo", TINY_MODEL, **fields)


def latent(**fields):
  return config("imagenet256_latent", TINY_LATENT, **fields)


def programs(group: str, mesh):
  """(name, lowered program) pairs of `group`."""
  n = mesh.size
  if group == "train":  # over a multi-host slice: the ways a train step is partitioned
    dp = sharding.create_mesh(None, list(mesh.devices.flat))
    fsdp = lambda c: sharding.create_mesh(c.mesh, list(mesh.devices.flat))
    yield "train step, jit, data parallel", plan.train_step(image(), dp)
    yield "train step, shard_map", plan.train_step(image(step_impl="shard_map"), dp)
    c = latent(**{"mesh.fsdp": n, "mesh.data": 1, "mesh.fsdp_min_size": 64})
    yield f"train step, FSDP over {n} chips", plan.train_step(c, fsdp(c))
    yield "train step, latent, unrolled blocks", plan.train_step(latent(), dp)
    c = latent(**{"model.scan_blocks": True, "model.remat": True, "model.dtype": "bfloat16"})
    yield "train step, latent, scanned blocks + remat, bf16", plan.train_step(c, dp)
  if group == "inference":  # on one chip: what sampling and fine-tuning run
    for name, c in (("ddpm, official guidance", latent(**{"sampler.name": "ddpm"})),
                    ("ddim", latent(**{"sampler.name": "ddim"})),
                    ("heun (EDM)", image(**{"sampler.name": "heun"})),
                    ("dpmpp_2m", latent(**{"sampler.name": "dpmpp_2m"}))):
      c.sampler.num_steps = 4
      yield f"sampler, {name}", plan.sampler(c, mesh, 4)
    yield "VAE decode", plan.vae_decode(latent(), mesh, 2, vae_config=TINY_VAE)
    yield "VAE encode", plan.vae_encode(mesh, 2, 16, vae_config=TINY_VAE)
    c = latent(init_from="", **{"optimizer.learning_rate": 1e-5})
    yield "fine-tune train step", plan.train_step(c, mesh)
  if group == "fid":  # the real FID network (it has no tiny variant): the longest compile
    yield "FID Inception features", plan.fid_features(mesh, 2, 32)


def main(slice_name: str, group: str) -> None:
  devices = tpu.compile_only_devices(slice_name)
  mesh = sharding.create_mesh(None, devices)
  for name, lowered in programs(group, mesh):
    p = plan.compile_plan(lowered)
    print(json.dumps(dict(program=name, slice=slice_name, hosts=tpu.num_hosts(devices),
                          platform=devices[0].platform, total=p.total, code=p.code,
                          arguments=p.arguments, temporaries=p.temporaries, flops=p.flops,
                          compile_seconds=round(p.compile_seconds, 1))), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
