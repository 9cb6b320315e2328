"""What several test modules share: the repository's paths, the tiny networks the training
tests run, the commands they start, data they write and how they compare results.

Plain functions and constants; the fixtures built on them are in tests/conftest.py. Test
modules import this module (tests/ is on sys.path under pytest), never each other.
"""

import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from diffit_jax import checkpoint
from diffit_jax.config_lib import load_config
from diffit_jax.data import latents
from diffit_jax.models.vae import AutoencoderKL, VAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_RUNLOCAL = os.path.join(REPO, "configs", "mnist_demo.py:runlocal")
LATENT_RUNLOCAL = os.path.join(REPO, "configs", "imagenet256_latent.py:runlocal")

# A one-stage image DiffiT of 9.5 K parameters.
TINY_MODEL = dict(channels=(16,), num_blocks=(1,), time_dim=32, frequency_size=16, head_dim=16,
                  num_groups=4)
TINY_MODEL_FLAGS = [f"--config.model.{key}={value}" for key, value in TINY_MODEL.items()]
# `tiny_config()` as command-line overrides of configs/mnist_demo.py:runlocal (less the
# number of steps and the logging, checkpoint and sample intervals, which each run sets).
TINY_FLAGS = [*TINY_MODEL_FLAGS, "--config.batch_size=8", "--config.sampler.num_steps=2",
              "--config.sample_grid.per_class=2", "--config.sample_grid.scale=1"]
# A latent DiffiT of two blocks on 8x8x4 latents (4x4 tokens), width 32.
TINY_LATENT_MODEL = dict(variant="custom", depth=2, hidden_size=32, num_heads=2, patch_size=2,
                         input_size=8)


def tiny_config(model=None, **overrides):
  """configs/mnist_demo.py:runlocal with the tiny network (`TINY_MODEL`, then the fields of
  `model`): batch 8, 4 steps logged every 2, no checkpoints or samples, samplers of 2 steps.

  `overrides` set top-level fields. An unconditional network (`num_classes=0`) samples
  unguided.
  """
  config = load_config(MNIST_RUNLOCAL)
  config.model.update(TINY_MODEL)
  config.model.update(model or {})
  config.batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 0
  config.sample_every_steps = 0
  config.sampler.num_steps = 2
  if not config.model.num_classes:
    config.sampler.guidance.scale = 1.0
  config.sample_grid.update(per_class=2, scale=1)
  for key, value in overrides.items():
    config[key] = value
  return config


def subprocess_env(**extra) -> dict[str, str]:
  """The environment of a command a test starts: the test process's (JAX on the CPU, with
  the suite's compilation cache: tests/conftest.py), this checkout's code first on the path,
  then `extra`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def installed_env() -> dict[str, str]:
  """The environment of a command run with the installed wheel (the `installed_python`
  fixture): no checkout on any path."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["PYTHONNOUSERSITE"] = "1"
  return env


def run_module(module, *args, devices=None, env=None, timeout=600, **kwargs):
  """`python -m module args` from the repository, finished: a CompletedProcess with text
  stdout and stderr. `devices` sets the number of host CPU devices (default: the test
  process's eight)."""
  env = dict(env or subprocess_env())
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def run_main(workdir, *flags, env=None, **kwargs) -> subprocess.Popen:
  """`python -m diffit_jax.main` of `tiny_config()` on the MNIST digits, started: its stdout
  and stderr together on `.stdout`."""
  cmd = [sys.executable, "-m", "diffit_jax.main", f"--config={MNIST_RUNLOCAL}",
         f"--workdir={workdir}", *TINY_FLAGS, *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def user_error(result) -> str:
  """The one `error:` line of a refused command (exit status 2, no traceback), its last."""
  output = result.stdout + result.stderr
  assert result.returncode == 2, output
  assert "Traceback" not in output and "FATAL" not in output, output
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), output
  return errors[0]


def write_latents(directory, n, *, shape=(8, 8, 4), num_classes=None, num_writers=1,
                  dtype=np.float16, mean=None, logvar=None, seed=0):
  """`n` latent records in `directory`, over `num_writers` shards; returns their (means,
  logvars), each of shape (n, 2, *shape) (a view and its mirror).

  The means are `mean` everywhere, else random, then so are the logvars. Record i has label
  i, or i % num_classes with `num_classes` (0: no labels, label 0), which also writes the
  dataset's info file.
  """
  rng = np.random.default_rng(seed)
  size = (n, 2, *shape)
  means = (rng.normal(size=size) if mean is None else np.full(size, mean)).astype(dtype)
  logvars = (rng.normal(size=size) if logvar is None else np.full(size, logvar)).astype(dtype)
  for shard in range(num_writers):
    with latents.LatentShardWriter(str(directory), shard, num_writers) as writer:
      for i in range(shard, n, num_writers):
        label = i if num_classes is None else i % num_classes if num_classes else 0
        writer.write(means[i], logvars[i], label=label)
  if num_classes is not None:
    latents.write_info(str(directory), num_classes=num_classes)
  return means, logvars


def write_tiny_vae(path):
  """A VAE of two levels (8x8 latents of 16x16 images) with its initial random weights,
  saved at `path` as `convert vae` saves one; returns the module."""
  config = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  vae = AutoencoderKL(config, rngs=nnx.Rngs(0))
  checkpoint.save_weights(str(path), nnx.to_pure_dict(nnx.state(vae, nnx.Param)),
                          metadata={"kind": "vae", "config": config.to_dict()})
  return vae


def host(tree):
  """`tree` as NumPy arrays on the host."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  """Same structure, bitwise the same arrays."""
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def rel(a, b) -> float:
  """The largest difference of `a` from `b`, relative to the largest magnitude of `b`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def nhwc(t) -> np.ndarray:
  """A PyTorch (B, C, H, W) tensor as a (B, H, W, C) array."""
  return t.detach().permute(0, 2, 3, 1).numpy()
