"""Every jitted program compiles for real TPU slices, with no TPU: libtpu's compiler on the CPU.

The programs (tests/tpu_programs.py) are compiled for a multi-host slice (v4-16: 8 chips on
2 hosts, one program over both processes) and a single chip (v5e-1), each in a process of
its own, side by side; the CLI's `--dry_run_tpu` runs as a user types it. These tests need
libtpu, installed as the README's test command does (`--target .venv/libtpu`), and skip,
saying so, without it.
"""

import json
import os
import subprocess
import sys

import pytest

from diffit_jax import tpu
from helpers import MNIST_RUNLOCAL, REPO, TINY_MODEL_FLAGS, subprocess_env

MULTI_HOST, SINGLE_CHIP = "v4-16", "v5e-1"
TRAIN = ["train step, jit, data parallel", "train step, shard_map", "train step, FSDP over 8 chips",
         "train step, latent, unrolled blocks", "train step, latent, scanned blocks + remat, bf16"]
INFERENCE = ["sampler, ddpm, official guidance", "sampler, ddim", "sampler, heun (EDM)",
             "sampler, dpmpp_2m", "VAE decode", "VAE encode", "fine-tune train step"]
FID = ["FID Inception features"]


def _libtpu():
  try:
    return tpu.library_path()
  except tpu.LibtpuMissingError as e:
    return pytest.skip(f"libtpu is not installed: {e}")


def _env():
  # JAX itself stays on the CPU; the compile-only TPU devices come from libtpu at this path.
  return subprocess_env(TPU_LIBRARY_PATH=_libtpu())


def _start(*args):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
  return out, err


def test_every_program_compiles_for_a_multi_host_slice_and_a_single_chip():
  script = os.path.join(REPO, "tests", "tpu_programs.py")
  procs = [_start(script, SINGLE_CHIP, "fid"), _start(script, MULTI_HOST, "train"),
           _start(script, SINGLE_CHIP, "inference")]
  plans = {}
  for proc in procs:
    out, _ = _finish(proc)
    for line in out.splitlines():
      row = json.loads(line)
      plans[row["program"]] = row
  assert list(plans) == FID + TRAIN + INFERENCE
  for name, row in plans.items():
    assert row["platform"] == "tpu", name
    assert row["total"] > 0 and row["arguments"] > 0 and row["code"] > 0, (name, row)
    assert row["flops"] > 0, (name, row)
    assert row["hosts"] == (2 if name in TRAIN else 1), (name, row)
  # FSDP splits the latent state 8 ways (its small biases stay whole): each chip holds less.
  assert (plans["train step, FSDP over 8 chips"]["arguments"]
          < plans["train step, latent, unrolled blocks"]["arguments"] / 2)
  print("\n".join(f"{r['slice']}: {name}: {r['total'] / 2 ** 20:.2f} MiB, compiled in "
                  f"{r['compile_seconds']} s" for name, r in plans.items()))


def test_dry_run_tpu_prints_the_train_steps_and_the_samplers_plan_per_chip():
  config = "--config=" + MNIST_RUNLOCAL
  train = _start("-m", "diffit_jax.main", config, *TINY_MODEL_FLAGS, "--config.batch_size=16",
                 f"--dry_run_tpu={MULTI_HOST}")
  sample = _start("-m", "diffit_jax.sample", config, *TINY_MODEL_FLAGS,
                  "--config.sampler.num_steps=4",
                  f"--dry_run_tpu={SINGLE_CHIP}", "--batch_size=8", "--num_samples=50000")
  out, err = _finish(train)
  assert "trainable_params:" in out
  assert (f"tpu_train_step_plan on {MULTI_HOST} (v4:2x2x2: 8 chips of TPU v4, 2 host "
          "process(es))") in out
  assert "global batch 16 over mesh {'data': 8, 'fsdp': 1}" in out
  assert "of 32 GiB HBM, fits: state and batch" in out
  assert "roofline bound: at least" in out and "not a measurement" in out
  assert "train_step_memory_per_device" not in out  # no CPU plan besides
  assert "TPU_" not in err and "libtpu" not in err.lower(), err  # libtpu is kept quiet
  out, err = _finish(sample)
  assert f"tpu_sampler_plan on {SINGLE_CHIP} (v5e:1x1: 1 chips of TPU v5e" in out
  assert "heun, 4 steps" in out and "global batch 8" in out
  assert "of 16 GiB HBM, fits" in out
  assert "50,000 samples: 6250 calls, at least" in out


def test_cpu_runs_stay_quiet_with_libtpu_installed_for_compiling():
  _libtpu()
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env.pop("TPU_LIBRARY_PATH", None)
  result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == "cpu"
  assert result.stderr == ""


def test_a_wrong_slice_or_a_missing_libtpu_is_one_error_line(tmp_path, monkeypatch):
  result = subprocess.run(
      [sys.executable, "-m", "diffit_jax.main", "--config=mnist_demo", "--dry_run_tpu=v7x-8"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --dry_run_tpu='v7x-8' names no TPU slice this knows: use a Cloud TPU name "
      "(v4-N, v5e-N, v5p-N, v6e-N; e.g. v5e-8, v5e-1, v4-8, v5p-8, v6e-8) or a topology "
      "(e.g. v5e:2x4, v4:2x2x2)."]
  assert "trainable_params" not in result.stdout  # said before any work
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setattr(tpu, "LIBTPU_FOLDER", str(tmp_path / "none"))
  monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(tpu.LibtpuMissingError, match=r"pip install --target .*none "
                     r"\"libtpu==0\.0\.42\.\*\""):
    tpu.library_path()


@pytest.mark.parametrize("name, topology, chips", [
    ("v5e-8", "v5e:2x4", 8), ("v5e-64", "v5e:8x8", 64), ("v5e-1", "v5e:1x1", 1),
    ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8), ("v4-8", "v4:2x2x1", 4),
    ("v4-16", "v4:2x2x2", 8), ("v4-32", "v4:2x2x4", 16), ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-128", "v5p:4x4x4", 64), ("v5e:2x2", "v5e:2x2", 4), ("V4:2x2x2", "v4:2x2x2", 8)])
def test_slice_names(name, topology, chips):
  s = tpu.parse_slice(name)
  assert (s.topology, s.num_chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5e-6", "v4-6", "v5e:2x2x2", "v9-8", "tpu"])
def test_slice_names_refused(name):
  with pytest.raises(tpu.ConfigError, match="--dry_run_tpu="):
    tpu.parse_slice(name)
