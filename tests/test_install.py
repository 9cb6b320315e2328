"""diffit_jax as a user gets it: a wheel installed into a fresh virtual environment.

The `installed_python` fixture (tests/conftest.py) builds the wheel and installs it
non-editable, offline, into a new virtual environment with no checkout on any path. Every
command here runs with that interpreter, from an empty folder: the configs must come from
the package (`--config=mnist_demo`), not from a `configs/` folder that happens to be near.
"""

import glob
import json
import os
import subprocess

import numpy as np
import pytest
import safetensors.numpy

from helpers import TINY_MODEL_FLAGS, installed_env

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (tests/ is on sys.path under pytest)

# configs/mnist_demo.py:runlocal shrunk to a 10 K-parameter network and a few steps.
TINY_FLAGS = [*TINY_MODEL_FLAGS, "--config.batch_size=8", "--config.num_train_steps=2",
              "--config.log_every_steps=1", "--config.checkpoint_every_steps=0",
              "--config.sample_every_steps=0", "--config.sampler.num_steps=2"]


def run(python, module, *args, cwd):
  """`python -m module args` in `cwd`, on the CPU (with the suite's compilation cache, as
  every command the tests start); the finished process."""
  env = dict(installed_env(), JAX_PLATFORMS="cpu")
  return subprocess.run([python, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


def ok(result) -> str:
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout + result.stderr


@pytest.fixture
def empty_dir(tmp_path):
  folder = tmp_path / "empty"
  folder.mkdir()
  return folder


def test_the_wheel_runs_not_the_checkout(installed_python, empty_dir):
  probe = ("import importlib.util, json, os, sys, diffit_jax\n"
           "from diffit_jax import config_lib\n"
           "print(json.dumps({'package': diffit_jax.__file__, 'prefix': sys.prefix,\n"
           "  'configs': config_lib.shipped_configs_dir(),\n"
           "  'top_level_configs': importlib.util.find_spec('configs') is not None,\n"
           "  'with_diffit_jax': [p for p in sys.path\n"
           "                      if os.path.isdir(os.path.join(p or '.', 'diffit_jax'))]}))")
  found = json.loads(ok(subprocess.run([installed_python, "-c", probe], cwd=empty_dir,
                                       env=installed_env(), capture_output=True, text=True)))
  venv = os.path.dirname(os.path.dirname(installed_python))
  assert found["prefix"] == venv
  assert found["package"].startswith(os.path.join(venv, "lib")), found
  assert found["configs"] == os.path.join(os.path.dirname(found["package"]), "configs"), found
  assert not found["top_level_configs"], found
  assert len(found["with_diffit_jax"]) == 1, found  # the venv's site-packages only


def test_dry_run_by_config_name_from_an_empty_folder(installed_python, empty_dir):
  out = ok(run(installed_python, "diffit_jax.main", "--config=mnist_demo", "--dry_run",
               "--nodry_run_memory", cwd=empty_dir))
  assert "trainable_params: 601065" in out, out
  assert "gflops_per_forward: 0.09" in out, out
  # The configs' docstrings spell it configs/NAME.py: outside a checkout that is the same config.
  out = ok(run(installed_python, "diffit_jax.main", "--config=configs/mnist_demo.py:runlocal",
               "--dry_run", "--nodry_run_memory", cwd=empty_dir))
  assert "trainable_params:" in out, out
  bad = run(installed_python, "diffit_jax.main", "--config=mnist_dmeo", "--dry_run", cwd=empty_dir)
  assert bad.returncode == 2, bad.stdout + bad.stderr
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "mnist_demo" in lines[0], lines
  assert os.listdir(empty_dir) == []


def test_train_then_sample_from_an_empty_folder(installed_python, empty_dir):
  ok(run(installed_python, "diffit_jax.main", "--config=mnist_demo:runlocal", "--workdir=run",
         *TINY_FLAGS, cwd=empty_dir))
  with open(empty_dir / "run" / "config.json") as f:
    assert json.load(f)["model"]["channels"] == [16]
  ok(run(installed_python, "diffit_jax.sample", "--workdir=run", "--num_samples=4",
         "--batch_size=4", "--num_steps=2", "--out=samples", cwd=empty_dir))
  (npz,) = glob.glob(str(empty_dir / "samples" / "samples_4x*.npz"))
  with np.load(npz) as f:
    assert f["arr_0"].shape == (4, 16, 16, 1) and f["arr_0"].dtype == np.uint8


def test_convert_official_layout_with_the_shipped_config(installed_python, empty_dir):
  model = torch_reference.LatentDiffiT(input_size=8, patch_size=2, hidden_size=32, depth=1,
                                       num_heads=2, num_classes=10).eval()
  src = str(empty_dir.parent / "official.safetensors")
  safetensors.numpy.save_file({k: v.numpy().copy() for k, v in model.state_dict().items()}, src)
  out = ok(run(installed_python, "diffit_jax.convert", "diffit", f"--src={src}",
               "--out=converted", cwd=empty_dir))
  venv = os.path.dirname(os.path.dirname(installed_python))
  assert f"config: {venv}" in out and "imagenet256_latent.py" in out, out
  with open(empty_dir / "converted" / "metadata.json") as f:
    config = json.load(f)["config"]
  # The released ImageNet-256 sampler travels with the weights; the model is the file's.
  assert config["sampler"]["guidance"]["schedule"] == "power_cosine", config["sampler"]
  assert config["model"]["input_size"] == 8 and config["model"]["num_classes"] == 10


# ----------------------------------------------------------------------------------------
# Config names, in this process (the checkout's configs are the shipped ones here).


def test_a_file_that_exists_wins_over_the_shipped_config_of_that_name(tmp_path, monkeypatch):
  from diffit_jax import config_lib

  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mnist_demo.py").write_text(
      "from diffit_jax.config_lib import load_config\n\n"
      "def get_config(arg=None):\n"
      "  config = load_config('mnist_demo')  # the shipped one, by name\n"
      "  config.batch_size = 5\n"
      "  return config\n")
  monkeypatch.chdir(tmp_path)
  assert config_lib.load_config("configs/mnist_demo.py").batch_size == 5
  assert config_lib.load_config("mnist_demo").batch_size == 32
  assert config_lib.load_config("mnist_demo.py:runlocal").batch_size == 16


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch):
  from diffit_jax import config_lib

  monkeypatch.chdir(tmp_path)
  names = config_lib.shipped_configs()
  assert {"mnist_demo", "cifar10", "imagenet256_latent"} <= set(names), names
  with pytest.raises(FileNotFoundError, match="no config named 'cifar100'.*mnist_demo"):
    config_lib.load_config("cifar100")
  with pytest.raises(FileNotFoundError, match="configs/cifar100.py does not exist.*mnist_demo"):
    config_lib.load_config("configs/cifar100.py")
  with pytest.raises(config_lib.ConfigError, match="use one of mnist_demo:runlocal"):
    config_lib.load_config("mnist_demo:bogus")
