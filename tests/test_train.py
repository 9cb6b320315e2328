"""Tests for the training loop: `diffit_jax.train`, its checkpoints, sharding, optimizer and EMA.

Every run uses a one-stage image DiffiT of 9.5 K parameters (`helpers.tiny_config`, or a
2-block latent one) on the offline MNIST digits, batch 8. What dominates the time is XLA
compiling the step on a small CPU: with the suite's persistent compilation cache
(tests/conftest.py), runs whose step program is identical (resume, SIGTERM) compile once,
and a second `pytest` run is several times faster.
"""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from flax import nnx

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import config_lib, diffusion, evaluation, files, logging_utils, models, optim, train
from diffit_jax import sharding as sharding_lib
from diffit_jax.config_lib import load_config
from helpers import (LATENT_RUNLOCAL, TINY_LATENT_MODEL, assert_trees_equal, host, run_main,
                     subprocess_env, tiny_config, write_latents)


def ema_config(**fields):
  """`config.ema`: the schema's defaults with `fields` set."""
  config = config_lib.base_config().ema
  config.update(fields)
  return config


def optimizer_config(**fields):
  """`config.optimizer`: the schema's defaults with `fields` set."""
  config = config_lib.base_config().optimizer
  config.update(fields)
  return config


# ----------------------------------------------------------------------------------------
# Optimizer and EMA.


def test_ema_decay_matches_numpy():
  batch = 64
  constant = optim.ema_decay(123, ema_config(decay=0.9999), batch)
  np.testing.assert_allclose(float(constant), 0.9999, rtol=1e-7)
  # EDM training_loop.py: half-life capped at rampup_ratio * images seen before this step.
  cfg = ema_config(decay=0.0, halflife_kimg=10.0, rampup_ratio=0.05)
  for step in (0, 1, 10, 3124, 3125, 10_000):
    halflife = min(10.0 * 1000, step * batch * 0.05)
    expected = 0.5 ** (batch / max(halflife, 1e-8))
    np.testing.assert_allclose(float(optim.ema_decay(step, cfg, batch)), expected, rtol=1e-5,
                               atol=1e-30)
  no_rampup = optim.ema_decay(0, ema_config(halflife_kimg=500.0, rampup_ratio=0.0), 512)
  np.testing.assert_allclose(float(no_rampup), 0.5 ** (512 / 500_000), rtol=1e-6)
  assert float(optim.ema_decay(5, ema_config(decay=0.0, halflife_kimg=0.0), batch)) == 0.0
  with pytest.raises(ValueError, match="both decay"):
    optim.validate_ema_config(ema_config(decay=0.999, halflife_kimg=10.0))


def test_update_ema_matches_numpy():
  rng = np.random.default_rng(0)
  ema, params = rng.normal(size=(2, 5, 3)).astype(np.float32)
  for beta in (0.0, 0.5, 0.9999):
    out = optim.update_ema({"w": jnp.asarray(ema)}, {"w": jnp.asarray(params)}, jnp.float32(beta))
    np.testing.assert_allclose(np.asarray(out["w"]), beta * ema + (1 - beta) * params, rtol=1e-6,
                               atol=1e-7)


def test_optimizer_warmup_clipping_and_names():
  cfg = optimizer_config(name="adam", learning_rate=1e-2, warmup_steps=4, grad_clip_norm=0.0)
  schedule = optim.learning_rate_schedule(cfg)
  np.testing.assert_allclose([float(schedule(i)) for i in range(6)],
                             [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6)
  # Clipping: a huge gradient gives the same first Adam update direction, bounded.
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([1e6, -2e6, 3e6])}
  tx = optim.create_optimizer(optimizer_config(**dict(cfg, grad_clip_norm=1.0, warmup_steps=0)))
  clipped, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.isfinite(clipped["w"]))
  inner = optax.clip_by_global_norm(1.0)
  g, _ = inner.update(grads, inner.init(params))
  np.testing.assert_allclose(float(optax.tree.norm(g)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="adamw"):
    optim.create_optimizer(optimizer_config(**dict(cfg, weight_decay=0.1)))
  with pytest.raises(ValueError, match="sgd"):
    optim.create_optimizer(optimizer_config(**dict(cfg, name="sgd")))


def test_label_dropout_uses_the_null_class():
  config = tiny_config()
  config.diffusion.class_dropout_prob = 0.25
  batch = {"image": jnp.zeros((4000, 2, 2, 1)), "label": jnp.arange(4000, dtype=jnp.int32) % 10}
  noise, sigma, labels = train.draw_step_randomness(config, jax.random.key(0), batch)
  labels = np.asarray(labels)
  dropped = labels == 10
  assert abs(dropped.mean() - 0.25) < 0.03
  np.testing.assert_array_equal(labels[~dropped], np.arange(4000)[~dropped] % 10)
  assert noise.shape == (4000, 2, 2, 1) and sigma.shape == (4000,)
  np.testing.assert_allclose(np.log(np.asarray(sigma)).mean(), -1.2, atol=0.1)  # ln s ~ N(-1.2, 1.2^2)


@pytest.mark.parametrize("name", ["edm", "adm"])
def test_public_loss_is_the_trainers_loss(name):
  """`diffusion.from_config(config).loss`, used as a user would (no trainer, no rng), gives
  per-example terms whose mean is the loss the train step differentiates."""
  if name == "edm":
    config = tiny_config()
  else:
    config = load_config(LATENT_RUNLOCAL)
    config.model.update(TINY_LATENT_MODEL, num_classes=3)
  # The user's side: a model, the process, the batch's noise levels and noise.
  model = models.build_model(config.model, rngs=nnx.Rngs(params=config.seed))
  process = diffusion.from_config(config)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, models.input_shape(config.model, 8)),
                   jnp.float32)
  y = jnp.arange(8) % config.model.num_classes
  t_rng, noise_rng = jax.random.split(jax.random.key(0))
  t = process.sample_t(t_rng, 8)
  noise = jax.random.normal(noise_rng, x0.shape)
  per_example, aux = nnx.jit(lambda m: process.loss(m, x0, y, t=t, noise=noise))(model)
  assert per_example.shape == (8,) and aux["mse"].shape == (8,)

  # The trainer's side: its loss function on the same weights and batch.
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  setup, _ = train.create_train_state(config, mesh, initialize=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loss_fn = jax.jit(train.make_loss_fn(config, setup.graphdef))
  loss, metrics = loss_fn(params, x0, y, noise, t, jax.random.key(1))
  np.testing.assert_allclose(float(loss), float(per_example.mean()), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mse"]), float(aux["mse"].mean()), rtol=1e-6)
  if name == "adm":
    assert float(metrics["vb"]) > 0
    np.testing.assert_allclose(float(metrics["vb"]), float(aux["vb"].mean()), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# The step on meshes.


def _states_on(config, devices, batch, steps=2):
  mesh = sharding_lib.create_mesh(config.mesh, devices)
  setup, state = train.create_train_state(config, mesh)
  step_fn = train.make_train_step(config, setup, mesh)
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  return state, metrics, setup


def test_sharded_steps_match_the_single_device_step():
  """8 devices (jit, shard_map, FSDP 2x4) give the 1-device result; shardings survive."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 host CPU devices"
  rng = np.random.default_rng(0)
  base = tiny_config()
  batch = {"image": rng.uniform(-1, 1, models.input_shape(base.model, 8)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  ref, ref_metrics, _ = _states_on(base, jax.devices()[:1], batch)
  assert int(ref.step) == 2 and np.isfinite(float(ref_metrics["loss"]))

  variants = {"jit": dict(), "shard_map": dict(step_impl="shard_map"),
              "fsdp": dict(mesh=dict(data=2, fsdp=4, fsdp_min_size=64))}
  results = {}
  for name, fields in variants.items():
    config = tiny_config()
    for key, value in fields.items():
      config[key] = value
    state, metrics, setup = _states_on(config, jax.devices(), batch)
    # The state keeps the layout it was created with (no silent resharding by the step).
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(
        f"{name}: {x.sharding} != {s}"), state, setup.shardings)
    for tree in ("params", "ema_params", "opt_state"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                   host(getattr(state, tree)), host(getattr(ref, tree)))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    results[name] = (state, setup)

  fsdp_state, fsdp_setup = results["fsdp"]
  specs = {str(s.spec) for s in jax.tree.leaves(fsdp_setup.shardings.params)}
  assert any("fsdp" in s for s in specs), specs  # FSDP really shards some weights
  # jit and shard_map are the same data-parallel step: equal to float rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               host(results["jit"][0].params), host(results["shard_map"][0].params))


def test_bfloat16_compute_keeps_float32_state():
  config = tiny_config()
  config.model.dtype = "bfloat16"
  batch = {"image": np.zeros(models.input_shape(config.model, 8), np.float32),
           "label": np.zeros(8, np.int32)}
  state, metrics, _ = _states_on(config, jax.devices()[:1], batch, steps=1)
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------------------
# The trainer end to end.


def test_main_entry_point_trains_on_demo_data(tmp_path):
  """`python -m diffit_jax.main` on the MNIST digits: logs, config, checkpoints, samples."""
  workdir = tmp_path / "run"
  proc = run_main(workdir, "--config.num_train_steps=4", "--config.log_every_steps=2",
                  "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1",
                  "--config.sample_every_steps=4")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "steps/s" in out and "img/s" in out and "ETA" in out, out
  rows = logging_utils.read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["train/loss"]) and r["train/images_per_sec"] > 0 for r in rows)
  assert (workdir / "loss.png").exists()
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["channels"] == [16] and config["num_train_steps"] == 4
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]  # keep_checkpoints=1
  grid = workdir / "samples" / "step_000004.png"
  image = np.asarray(Image.open(grid))
  cell = config["model"]["image_size"] + 2  # 2-pixel gaps
  assert image.shape == (10 * cell + 2, 2 * cell + 2)  # one row per class, 2 samples each
  params, saved_config = checkpoint_lib.load_run_params(str(workdir))
  assert saved_config["model"]["num_classes"] == 10
  assert params["tokenizer"]["kernel"].shape == (3, 3, 1, 16)  # the tiny network
  assert isinstance(params["encoder"][0][0]["conv"]["kernel"], np.ndarray)  # int keys restored


def test_resume_is_exact(tmp_path):
  """N steps, stop, resume for N more == 2N straight, bitwise; keep-N; no half checkpoints."""
  straight = train.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path / "straight"))

  workdir = str(tmp_path / "resumed")
  first = train.train_and_evaluate(
      tiny_config(num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=2), workdir)
  assert int(first.step) == 4
  ckpt_dir = os.path.join(workdir, checkpoint_lib.TRAIN_CHECKPOINT_DIR)
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  # A save that died half-way (Orbax's temporary folder) must not be loaded.
  partial = os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "train_state"))
  assert checkpoint_lib.TrainCheckpointer(workdir).latest_step() == 4

  resumed = train.train_and_evaluate(
      tiny_config(num_train_steps=8, checkpoint_every_steps=2, keep_checkpoints=2), workdir)
  assert int(resumed.step) == 8
  assert sorted(os.listdir(ckpt_dir)) == ["6", "8"]
  assert_trees_equal(resumed, straight)
  # The metrics continue where they stopped, with the same losses as the straight run.
  straight_rows = logging_utils.read_metrics(str(tmp_path / "straight"))
  resumed_rows = logging_utils.read_metrics(workdir)
  assert [r["step"] for r in resumed_rows] == [2, 4, 6, 8]
  assert [r["train/loss"] for r in resumed_rows] == [r["train/loss"] for r in straight_rows]
  # Samplers and exporters read the newest EMA weights.
  ema, config = checkpoint_lib.load_run_params(workdir)
  assert_trees_equal(ema, straight.ema_params)
  assert config["num_train_steps"] == 8
  older, _ = checkpoint_lib.load_run_params(workdir, step=6)
  assert not np.array_equal(older["head"]["kernel"], ema["head"]["kernel"])


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main(workdir, "--config.num_train_steps=100000", "--config.log_every_steps=1",
                  "--config.checkpoint_every_steps=0", "--config.sample_every_steps=0")
  metrics = workdir / logging_utils.METRICS_FILE
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "SIGTERM" in out
  steps = checkpoint_lib.TrainCheckpointer(str(workdir)).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 100000, (steps, out)
  logged = [r["step"] for r in logging_utils.read_metrics(str(workdir))]
  assert logged[-1] == steps[0]  # it stopped right after the step it saved


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(num_train_steps=2, checkpoint_every_steps=2), workdir)
  config = tiny_config(num_train_steps=40, log_every_steps=4, checkpoint_every_steps=2)
  config.optimizer.learning_rate = 1e30  # blows the weights up after the first update
  with pytest.raises(train.NonFiniteLossError, match=r"between steps \d+ and \d+") as error:
    train.train_and_evaluate(config, workdir)
  assert "The newest good checkpoint is step 2" in str(error.value)
  steps = checkpoint_lib.TrainCheckpointer(workdir).all_steps()
  assert steps[-1] < 40
  ema, _ = checkpoint_lib.load_run_params(workdir)
  assert 2 in steps and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))


def test_latent_adm_training_with_samples_and_fid_hook(tmp_path, monkeypatch):
  """ADM hybrid loss on `latents:` records; EMA grids; the periodic-FID hook."""
  data_dir = str(tmp_path / "latents")
  write_latents(data_dir, 16, num_classes=3, logvar=-2.0)

  calls = []

  class FakeEvaluator:
    def __init__(self, inception, reference, **kwargs):
      calls.append(("init", inception, reference))

    def __call__(self, batches, total, precision_recall):
      images = np.concatenate(list(batches))
      calls.append(("eval", images.shape, images.dtype, total))
      return {"fid": 12.5, "sfid": None}

  monkeypatch.setattr(evaluation, "Evaluator", FakeEvaluator)

  config = load_config(LATENT_RUNLOCAL)
  # Smaller than the table's smallest row (S/2, 33 M parameters).
  config.model.update(TINY_LATENT_MODEL, num_classes=3)
  config.data.update(name="latents:" + data_dir, num_workers=0)
  config.batch_size, config.num_train_steps, config.log_every_steps = 8, 2, 1
  config.checkpoint_every_steps, config.sample_every_steps = 0, 2
  config.sampler.num_steps = 2
  config.sample_grid.update(classes=(0, 2), per_class=2, num_steps=2)  # one sampler for both
  config.eval.update(every_steps=2, num_samples=5, batch_size=4, inception="inc", reference="ref")
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  rows = logging_utils.read_metrics(str(workdir))
  assert {"train/loss", "train/mse", "train/vb"} <= set(rows[0])
  assert np.isfinite(rows[0]["train/vb"]) and rows[-1]["eval/fid"] == 12.5
  assert calls[0] == ("init", "inc", "ref")
  assert calls[1] == ("eval", (5, 8, 8, 3), np.uint8, 5)  # latents without a VAE: 3 channels
  assert (workdir / "samples" / "step_000002.png").exists()


def test_two_processes_on_localhost_and_preemption(tmp_path, free_port):
  """Two JAX processes (2 CPU devices each) run the real CLI on their shards of the digits;
  SIGTERM to one of them makes both checkpoint the same step and exit cleanly."""
  port = free_port
  workdir = tmp_path / "run"
  procs = []
  for i in range(2):
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                         JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    procs.append(run_main(
        workdir, "--config.num_train_steps=100000", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=0", "--config.sample_every_steps=0",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        env=env))
  try:
    metrics = workdir / logging_utils.METRICS_FILE  # written by process 0 only
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.2)
    assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
    # The two processes are one writer: process 0 holds the workdir's lock for both.
    holder = json.loads((workdir / files.LOCK_FILE).read_text())
    assert holder["pid"] == procs[0].pid, holder
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one VM
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert not (workdir / files.LOCK_FILE).exists()  # released at exit
  assert "process 0 of 2, 2 local / 4 global devices" in outs[0]
  assert "Mesh {'data': 4, 'fsdp': 1}" in outs[0]
  steps = checkpoint_lib.TrainCheckpointer(str(workdir)).all_steps()
  assert len(steps) == 1 and steps[0] >= 3, steps
  for out in outs:
    assert f"Saved checkpoint {steps[0]} after SIGTERM" in out
  data_files = set(os.listdir(workdir / "checkpoints" / str(steps[0]) / "data_iterator"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files  # each its own shard
  params, _ = checkpoint_lib.load_run_params(str(workdir))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
