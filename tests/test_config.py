"""Faults in configs and inputs, injected through the real command lines and the public API.

A misspelt field, an unknown `:arg` variant, a wrong name, a batch the devices cannot
split or data the model cannot take (latents without labels for a class-conditional model,
label dropout or guidance for an unconditional one) must be refused before anything is
written or compiled, with one `error: ...` line and exit
status 2; every field the schema (`diffit_jax.config_lib`) declares can be overridden on
the command line, whether a config file sets it or not.
"""

import glob
import os
import re

import numpy as np
import pytest

from diffit_jax import config_lib, train
from diffit_jax import run as run_lib
from helpers import (LATENT_RUNLOCAL, REPO, TINY_LATENT_MODEL, TINY_MODEL_FLAGS, run_module,
                     user_error, write_latents)

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
MNIST = os.path.join(REPO, "configs", "mnist_demo.py")
# A one-step run of a 9.5 K-parameter network: what today's code would train, quickly.
TINY_RUN = [*TINY_MODEL_FLAGS, "--config.batch_size=8", "--config.num_train_steps=1",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=0",
            "--config.sample_every_steps=0"]


def train_cli(workdir, *args, config=MNIST + ":runlocal", devices=1):
  return run_module("diffit_jax.main", f"--config={config}", f"--workdir={workdir}", *TINY_RUN,
                    *args, devices=devices)


def typo_config(tmp_path) -> str:
  path = tmp_path / "typo.py"
  path.write_text("from diffit_jax.config_lib import load_config\n\n\n"
                  "def get_config(arg=None):\n"
                  f"  config = load_config({MNIST + ':runlocal'!r})\n"
                  "  config.optimizer.learnig_rate = 1e-3\n"
                  "  return config\n")
  return str(path)


# ----------------------------------------------------------------------------------------
# 1. One schema: misspelt fields are refused, every declared field can be overridden.


def test_a_misspelt_field_in_a_config_file_is_refused_before_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  error = user_error(train_cli(workdir, config=typo_config(tmp_path)))
  assert error == ("error: config.optimizer.learnig_rate is not a field; did you mean "
                   "config.optimizer.learning_rate?"), error
  assert not workdir.exists()


def test_a_misspelt_override_is_refused_with_the_closest_field(tmp_path):
  error = user_error(train_cli(tmp_path / "run", "--config.optimizer.learnig_rate=1e-3"))
  assert "config.optimizer.learnig_rate is not a field" in error, error
  assert "did you mean config.optimizer.learning_rate?" in error, error
  assert not (tmp_path / "run").exists()


def test_every_config_holds_exactly_the_schema_fields():
  """So that `--config.a.b=v` works for every declared field of every config."""
  for path in CONFIGS:
    for spec in [path] + [f"{path}:{arg}" for arg in config_lib.config_args(path)]:
      config = config_lib.load_config(spec)
      schema = config_lib.base_config(config.model.name)
      assert config_lib.field_paths(config) == config_lib.field_paths(schema), spec


def test_fields_a_config_file_does_not_set_can_be_overridden():
  result = run_module("diffit_jax.main", "--config=configs/cifar10.py:runlocal", "--dry_run",
                      "--nodry_run_memory", "--config.data.shuffle=False",
                      "--config.data.worker_buffer_size=2", "--config.diffusion.num_timesteps=10",
                      "--config.sampler.eta=0.5", devices=1)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "trainable_params:" in result.stdout


def test_the_public_api_refuses_unknown_fields_and_other_models_fields():
  config = config_lib.load_config(MNIST + ":runlocal")
  config.optimizer.learnig_rate = 1e-3
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "did you mean config.optimizer.learning_rate?")):
    run_lib.validate_config(config)
  config = config_lib.load_config(MNIST)
  config.model.variant = "S/2"  # a latent model's field on an image model
  with pytest.raises(config_lib.ConfigError, match="config.model.variant is not a field of "
                     "the 'image' model"):
    run_lib.validate_config(config)
  config = config_lib.load_config(MNIST)
  del config.ema["rampup_ratio"]
  with pytest.raises(config_lib.ConfigError, match="config.ema.rampup_ratio is missing"):
    run_lib.validate_config(config)


def test_a_saved_config_reads_back_through_the_schema(tmp_path):
  """A config.json or converted checkpoint written before a field existed reads back with the
  schema's default for it; a field the schema does not declare is refused as in a file."""
  import json
  from diffit_jax import checkpoint, inference
  config = config_lib.load_config(MNIST + ":runlocal")
  old = json.loads(config.to_json())
  del old["sampler"]["churn_noise"], old["sampler"]["guidance"]["interval"], old["mesh"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  back = checkpoint.read_run_config(str(tmp_path))
  assert back.sampler.churn_noise == config_lib.base_config().sampler.churn_noise == 1.0
  assert back.to_dict() == config.to_dict()
  assert inference.resolve_config(None, str(tmp_path), None).to_dict() == config.to_dict()
  converted = str(tmp_path / "converted")
  checkpoint.save_weights(converted, {"w": np.zeros(2)}, metadata={"kind": "diffit",
                                                                   "config": old})
  assert checkpoint.converted_config(converted).to_dict() == config.to_dict()
  old["sampler"]["num_step"] = 10
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f"{tmp_path}/config.json: config.sampler.num_step is not a field; did you mean "
      "config.sampler.num_steps?")):
    checkpoint.read_run_config(str(tmp_path))


# ----------------------------------------------------------------------------------------
# 2. The `:arg` variant of a config file.


def test_an_unknown_config_arg_is_refused_naming_the_valid_ones():
  error = user_error(run_module("diffit_jax.main", "--config=configs/cifar10.py:bogus",
                                "--dry_run", "--nodry_run_memory", devices=1))
  assert "'bogus'" in error and "runlocal" in error, error
  with pytest.raises(config_lib.ConfigError, match="runlocal"):
    config_lib.load_config(os.path.join(REPO, "configs", "ffhq64.py:runlcoal"))


def test_runlocal_shrinks_the_training_grids_not_the_sampler():
  """`sample --workdir` of a `:runlocal` run draws with the full config's sampler."""
  for path in CONFIGS:
    if "runlocal" not in config_lib.config_args(path):
      continue
    full, local = config_lib.load_config(path), config_lib.load_config(f"{path}:runlocal")
    name = os.path.basename(path)
    assert local.sampler.to_dict() == full.sampler.to_dict(), name
    assert 0 < local.sample_grid.num_steps < full.sampler.num_steps, name


# ----------------------------------------------------------------------------------------
# 3. Everything is validated before the workdir is written.


def test_a_batch_the_devices_cannot_split_is_refused_before_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  error = user_error(train_cli(workdir, "--config.batch_size=9", devices=2))
  assert "config.batch_size=9" in error and "2 devices" in error, error
  assert not workdir.exists()


def test_missing_data_is_refused_before_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  error = user_error(train_cli(workdir, f"--config.data.name=folder:{tmp_path}/no_such_data"))
  assert "no_such_data is not a built dataset" in error, error
  assert not workdir.exists()


@pytest.mark.parametrize("field, value", [
    ("optimizer.name", "sgd"), ("sampler.name", "heunn"), ("model.dtype", "float16"),
    ("diffusion.name", "ddpm"), ("step_impl", "pmap"), ("keep_checkpoints", 0),
    ("sampler.guidance.schedule", "cosine"), ("eval.every_steps", 10)])
def test_bad_values_are_refused_before_the_workdir(tmp_path, field, value):
  config = config_lib.load_config(MNIST + ":runlocal")
  *groups, key = field.split(".")
  group = config
  for name in groups:
    group = group[name]
  group[key] = value
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{field.split('.')[0]}")
                     ) as error:
    train.train_and_evaluate(config, str(workdir))
  assert str(value) in str(error.value) or field in str(error.value), error.value
  assert not workdir.exists()


# configs/imagenet256_latent.py:runlocal with a 2-block network on 8x8x4 latents.
TINY_LATENT_RUN = [*(f"--config.model.{key}={value}" for key, value in TINY_LATENT_MODEL.items()),
                   "--config.data.num_workers=0", "--config.batch_size=8",
                   "--config.num_train_steps=1", "--config.sample_every_steps=0"]


def unlabelled_latents(path) -> str:
  """A latent dataset of 16 records of 8x8x4 latents without class labels (as `encode`
  writes for a folder without class sub-folders)."""
  write_latents(path, 16, num_classes=0, logvar=-2.0)
  return str(path)


@pytest.mark.parametrize("overrides, wanted", [
    # The latent preset as it is: class-conditional, on data without labels.
    ([], ["config.model.num_classes=0", "config.diffusion.class_dropout_prob=0",
          "config.sampler.guidance.scale=1"]),
    # Made unconditional: the label dropout and the guidance scale, in one line.
    (["--config.model.num_classes=0"],
     ["config.diffusion.class_dropout_prob=0 (it is 0.1)", "config.sampler.guidance.scale=1 (it "
      "is 4.4)"]),
    # Only the guidance scale left: named as the config field, not the sampler's argument.
    (["--config.model.num_classes=0", "--config.diffusion.class_dropout_prob=0"],
     ["config.sampler.guidance.scale=1 (it is 4.4)"]),
    # Latents of another size than the model's: refused before the step is compiled.
    (["--config.model.num_classes=0", "--config.diffusion.class_dropout_prob=0",
      "--config.sampler.guidance.scale=1", "--config.model.input_size=16"],
     ["config.model.input_size=8"]),
], ids=["conditional", "dropout_and_guidance", "guidance", "latent_size"])
def test_an_unconditional_latent_run_is_told_every_field_at_start(tmp_path, overrides, wanted):
  data = unlabelled_latents(tmp_path / "latents")
  workdir = tmp_path / "run"
  error = user_error(run_module(
      "diffit_jax.main", f"--config={LATENT_RUNLOCAL}", f"--workdir={workdir}",
      f"--config.data.name=latents:{data}", *TINY_LATENT_RUN, *overrides, devices=1))
  for field in wanted:
    assert field in error, error
  assert "guidance_scale=1" not in error, error
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------
# 4. User errors of the command lines: one line, exit status 2.


def test_main_without_workdir_is_one_error_line():
  error = user_error(run_module("diffit_jax.main", "--config=configs/mnist_demo.py", devices=1))
  assert "--workdir" in error, error


def test_encode_command_of_the_latent_config_docstring_parses(tmp_path):
  """The `Encode:` line of configs/imagenet256_latent.py: its flags exist (the run then
  stops at the missing VAE, with one line)."""
  with open(os.path.join(REPO, "configs", "imagenet256_latent.py")) as f:
    line = next(l for l in f if l.startswith("Encode:"))
  args = line.split("python -m diffit_jax.encode", 1)[1].split()
  args = [a.replace("VAE_DIR", str(tmp_path / "no_vae")).replace(
      "data/in256_latents", str(tmp_path / "latents")) for a in args]
  args = [a for a in args if not a.startswith("--data=")] + ["--data=mnist_demo", "--limit=2"]
  error = user_error(run_module("diffit_jax.encode", *args, devices=1))
  assert "no_vae" in error, error
  assert "Unknown command line flag" not in error


def test_encode_usage_errors_are_one_line():
  error = user_error(run_module("diffit_jax.encode", "--config=configs/imagenet256_latent.py",
                                devices=1))
  assert "config" in error, error
  error = user_error(run_module("diffit_jax.encode", "--data=mnist_demo", devices=1))
  assert "--vae" in error and "--out" in error, error


def test_the_missing_vae_advice_is_a_command_convert_takes(tmp_path):
  """The `convert vae` command a latent run without a VAE is told to run: its flags exist
  (it then stops at the missing --src, with one line)."""
  from diffit_jax import inference  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as advice:
    inference.make_decoder(config_lib.load_config(LATENT_RUNLOCAL), None, None)
  command = re.search(r"`python -m diffit_jax\.convert (vae [^`]*)`", str(advice.value))
  assert command, advice.value
  args = [a.replace("DIR", str(tmp_path / "vae")).replace("sd-vae-ft-ema",
                                                         str(tmp_path / "no_vae"))
          for a in command.group(1).split()]
  error = user_error(run_module("diffit_jax.convert", *args, devices=1))
  assert "no_vae" in error and "does not exist" in error, error
