"""Tests of `python -m diffit_jax.encode`: posterior records match the VAE, sharded or not."""

import os

import jax.numpy as jnp
import numpy as np

from diffit_jax import encode
from diffit_jax.data import latents, mnist, pipeline, transforms
from helpers import run_module, write_tiny_vae


def test_encode_matches_vae_and_trains_from_records(tmp_path):
  vae = write_tiny_vae(tmp_path / "vae")
  cfg = pipeline.get_default_data_config()
  cfg.update(name="mnist_demo", image_size=32, channels=3)
  dst = str(tmp_path / "latents")
  n = encode.encode_dataset(cfg, str(tmp_path / "vae"), dst, batch_size=4, dtype="float32",
                            limit=11)
  assert n == 11
  source, info = pipeline.create_data_source(_latent_cfg(dst))
  assert info.num_examples == 11 and info.num_classes == 10 and info.example_shape == (16, 16, 4)
  # Record i holds the posterior of digit i and of its mirror, as the VAE computes them.
  digits = mnist.MnistDemoSource(3)
  images = np.stack([transforms.fit_image(digits[i]["image"], 32, 3) for i in range(11)])
  x = jnp.asarray(transforms.uint8_to_unit_range(images))
  mean, logvar = vae.encode(x)
  mean_m, _ = vae.encode(x[:, :, ::-1])
  stored = [latents.decode_record(source[i]) for i in range(11)]
  np.testing.assert_allclose(np.stack([r["mean"][0] for r in stored]), mean, atol=1e-5)
  np.testing.assert_allclose(np.stack([r["mean"][1] for r in stored]), mean_m, atol=1e-5)
  np.testing.assert_allclose(np.stack([r["logvar"][0] for r in stored]), logvar, atol=1e-5)
  assert [r["label"] for r in stored] == [digits[i]["label"] for i in range(11)]
  batch = next(pipeline.create_train_iterator(_latent_cfg(dst), global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 4) and batch["image"].dtype == np.float32


def _latent_cfg(dst):
  cfg = pipeline.get_default_data_config()
  cfg.update(name=f"latents:{dst}", random_flip=True)
  return cfg


def test_encode_cli_reports_bad_input(tmp_path):
  result = run_module("diffit_jax.encode", f"--vae={tmp_path}/missing", "--data=mnist_demo",
                      "--resolution=32", f"--out={tmp_path}/out")
  assert result.returncode == 2 and "error:" in result.stderr
  assert not os.path.exists(tmp_path / "out" / latents.shard_filename(0, 1))
