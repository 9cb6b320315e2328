"""One's own images, as a user trains on them: `data build` a folder, then configs/custom_folder.py.

A folder of generated 16x16 PNGs in two class sub-folders goes through the real command
lines: `python -m diffit_jax.data build`, `python -m diffit_jax.main` with the preset (the
resolution, channels and classes come from the built dataset), `python -m diffit_jax.sample
--workdir`. A config whose resolution differs from the dataset's is refused at start, before
the workdir exists, unless `config.data.allow_resize` asks for the resize.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffit_jax import config_lib
from diffit_jax import run as run_lib
from helpers import REPO, TINY_MODEL_FLAGS, run_module, user_error

PRESET = os.path.join(REPO, "configs", "custom_folder.py")
SIDE = 16  # the dataset's resolution; every config in configs/ would say otherwise
# A 9.5 K-parameter one-stage network, two steps, samples of two Heun steps.
TINY_RUN = [*TINY_MODEL_FLAGS, "--config.data.num_workers=0", "--config.batch_size=8",
            "--config.num_train_steps=2", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=0", "--config.sample_every_steps=0",
            "--config.sampler.num_steps=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
  """`data build` of 2 x 8 generated 16x16 PNGs in class sub-folders `cats/` and `dogs/`."""
  root = tmp_path_factory.mktemp("custom")
  rng = np.random.default_rng(0)
  for label, name in enumerate(["cats", "dogs"]):
    os.makedirs(root / "images" / name)
    for i in range(8):
      pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
      pixels[..., label] = 255  # one colour per class
      Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
  dst = str(root / "dataset")
  result = run_module("diffit_jax.data", "build", f"--src={root / 'images'}", f"--out={dst}",
                      devices=1)
  assert result.returncode == 0, result.stdout + result.stderr
  return dst


def test_custom_folder_journey_takes_the_resolution_from_the_dataset(dataset, tmp_path):
  workdir = tmp_path / "run"
  result = run_module("diffit_jax.main", f"--config={PRESET}:classes", f"--workdir={workdir}",
                      f"--config.data.name=folder:{dataset}", *TINY_RUN, devices=1)
  assert result.returncode == 0, result.stdout + result.stderr
  with open(workdir / "config.json") as f:
    saved = json.load(f)
  model, data = saved["model"], saved["data"]
  assert (model["image_size"], model["in_channels"], model["out_channels"]) == (SIDE, 3, 3)
  assert (data["image_size"], data["channels"]) == (SIDE, 3)
  assert model["num_classes"] == 2  # cats, dogs
  # The run's config.json is all `sample` needs.
  out = tmp_path / "samples"
  result = run_module("diffit_jax.sample", f"--workdir={workdir}", "--num_samples=2",
                      "--batch_size=2", f"--out={out}", devices=1)
  assert result.returncode == 0, result.stdout + result.stderr
  with np.load(out / f"samples_2x{SIDE}x{SIDE}x3.npz") as samples:
    assert samples["arr_0"].shape == (2, SIDE, SIDE, 3)
    assert set(samples["arr_1"]) <= {0, 1}


@pytest.mark.parametrize("config, overrides, wanted", [
    # The recipe the README used to give: a 64 px preset would upscale the 16 px images.
    ("ffhq64.py:runlocal", [],
     ["holds 16x16 images", "config.data.image_size=64 would upscale",
      "config.data.image_size=16 and config.model.image_size=16", "config.data.allow_resize"]),
    # The preset, with a model resolution set by hand.
    ("custom_folder.py", ["--config.model.image_size=32"], ["set config.model.image_size=16"]),
], ids=["ffhq64", "model_size"])
def test_a_resolution_mismatch_is_refused_before_the_workdir(dataset, tmp_path, config,
                                                              overrides, wanted):
  workdir = tmp_path / "run"
  error = user_error(run_module(
      "diffit_jax.main", f"--config={os.path.join(REPO, 'configs', config)}",
      f"--workdir={workdir}", f"--config.data.name=folder:{dataset}", *TINY_RUN, *overrides,
      devices=1))
  for part in wanted:
    assert part in error, error
  assert not workdir.exists()


def test_allow_resize_is_the_explicit_way_to_resize(dataset):
  config = config_lib.load_config(os.path.join(REPO, "configs", "ffhq64.py:runlocal"))
  config.data.name = f"folder:{dataset}"
  with pytest.raises(config_lib.ConfigError, match="config.data.allow_resize"):
    run_lib.fit_to_data(config)
  config.data.allow_resize = True
  info = run_lib.fit_to_data(config)
  assert info.stored_shape == (SIDE, SIDE, 3) and info.example_shape == (64, 64, 3)
  run_lib.validate_config(config)


def test_the_fields_left_to_the_dataset_are_filled_or_refused(dataset):
  config = config_lib.load_config(PRESET + ":classes")
  assert config_lib.left_to_data(config) == [
      "config.data.image_size=0", "config.data.channels=0", "config.model.image_size=0",
      "config.model.in_channels=0", "config.model.out_channels=0", "config.model.num_classes=-1"]
  with pytest.raises(config_lib.ConfigError, match="leave these fields to the dataset"):
    run_lib.validate_config(config)  # e.g. sampling from the preset without the run's config
  config.data.name = f"folder:{dataset}"
  run_lib.fit_to_data(config)
  assert config_lib.left_to_data(config) == []
  assert (config.model.image_size, config.model.num_classes) == (SIDE, 2)
  run_lib.validate_config(config)
  # A class-conditional preset on a dataset without classes says what to change.
  config = config_lib.load_config(PRESET + ":classes")
  with pytest.raises(config_lib.ConfigError, match="config.model.num_classes=0"):
    config_lib.fill_from_data(config, (SIDE, SIDE, 3), num_classes=0)
