"""End-to-end tests of `python -m diffit_jax.sample` on a tiny random-weight network."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from diffit_jax import checkpoint, files, models, sample
from diffit_jax.config_lib import load_config
from helpers import (REPO, TINY_LATENT_MODEL, run_module, subprocess_env, tiny_config,
                     write_tiny_vae)

# `tiny_config` with two stages, on 16x16 digits.
TWO_STAGES = dict(channels=(16, 16), num_blocks=(1, 1), image_size=16)


def random_params(cfg, seed=0):
  model = models.build_model(cfg.model, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)  # random weights: a zero head would hide mistakes
  return jax.tree.map(lambda x: 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def write_checkpoint(path, cfg, seed=0):
  checkpoint.save_weights(str(path), random_params(cfg, seed),
                          metadata={"kind": "diffit", "config": cfg.to_dict()})
  return str(path)


def write_train_checkpoint(workdir, cfg, step, seed):
  """A training checkpoint at `step` whose EMA weights are `random_params(cfg, seed)`."""
  ckpt = checkpoint.TrainCheckpointer(str(workdir), async_save=False)
  ckpt.save(step, {"step": np.int32(step), "ema_params": random_params(cfg, seed)},
            config=cfg.to_dict())
  ckpt.close()


def write_config_file(path, cfg):
  """A `--config` file holding `cfg` (JSON inside a `get_config`)."""
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config(arg=None):\n"
                  f"  return ml_collections.ConfigDict(json.loads({json.dumps(cfg.to_dict())!r}))\n")
  return str(path)


def run_cli(*flags):
  return run_module("diffit_jax.sample", *flags)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "cond", tiny_config(TWO_STAGES))


def load(path):
  with np.load(path) as f:
    return f["arr_0"], f["arr_1"]


def test_writes_exactly_num_samples_and_resumes(conditional_checkpoint, tmp_path):
  out = tmp_path / "a"
  path = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(out), num_samples=7,
                    batch_size=3, labels="cycle", seed=1)
  images, labels = load(path)
  assert images.shape == (7, 16, 16, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6])
  assert images.std() > 0 and os.path.exists(out / "grid.png")
  # Same seed, other batch size (and a padded tail): identical samples.
  other = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path / "b"),
                     num_samples=7, batch_size=4, labels="cycle", seed=1)
  np.testing.assert_array_equal(load(other)[0], images)
  # An interrupted run keeps its finished batches: delete one part and the result, rerun.
  parts = sorted(p for p in os.listdir(out / "parts") if p.endswith(".npz"))
  assert len(parts) == 3
  os.remove(out / "parts" / parts[1])
  os.remove(path)
  mtime = os.path.getmtime(out / "parts" / parts[0])
  again = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(out), num_samples=7,
                     batch_size=3, labels="cycle", seed=1)
  np.testing.assert_array_equal(load(again)[0], images)
  assert os.path.getmtime(out / "parts" / parts[0]) == mtime  # not recomputed


def test_random_labels_are_uniform_and_seeded(conditional_checkpoint):
  labels = sample.draw_labels("random", 5000, 10, seed=3)
  np.testing.assert_array_equal(labels, sample.draw_labels("random", 5000, 10, seed=3))
  counts = np.bincount(labels, minlength=10)
  assert counts.min() > 400 and counts.max() < 600
  np.testing.assert_array_equal(sample.draw_labels("2,5", 5, 10, 0), [2, 5, 2, 5, 2])
  with pytest.raises(ValueError, match="class ids"):
    sample.draw_labels("3,12", 4, 10, 0)


def test_bad_arguments_fail_before_sampling(conditional_checkpoint, tmp_path):
  with pytest.raises(ValueError, match="Unknown sampler 'plms'"):
    sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path),
               sampler_overrides={"name": "plms"})
  wrong = tiny_config(TWO_STAGES)
  wrong.model.channels = (16, 32)
  with pytest.raises(ValueError, match="do not match config.model"):
    sample.run(wrong, checkpoint_path=conditional_checkpoint, out=str(tmp_path))
  uncond = write_checkpoint(tmp_path / "uncond", tiny_config(dict(TWO_STAGES, num_classes=0)))
  with pytest.raises(ValueError, match="class-conditional"):
    sample.run(None, checkpoint_path=uncond, out=str(tmp_path),
               sampler_overrides={"guidance.scale": 3.0})
  with pytest.raises(ValueError, match="exactly one of"):
    sample.run(None, out=str(tmp_path))


def test_cli_end_to_end(conditional_checkpoint, tmp_path):
  result = run_cli(f"--checkpoint={conditional_checkpoint}", f"--out={tmp_path}",
                   "--num_samples=5", "--batch_size=8", "--labels=4")
  assert result.returncode == 0, result.stderr
  images, labels = load(tmp_path / "samples_5x16x16x1.npz")
  assert images.shape == (5, 16, 16, 1) and list(labels) == [4] * 5
  bad = run_cli(f"--checkpoint={conditional_checkpoint}", f"--out={tmp_path}", "--sampler=plms")
  assert bad.returncode == 2 and "Unknown sampler" in bad.stderr
  (tmp_path / "a_file").write_text("")
  not_a_folder = run_cli(f"--checkpoint={conditional_checkpoint}", f"--out={tmp_path / 'a_file'}")
  assert not_a_folder.returncode == 2 and "Traceback" not in not_a_folder.stderr
  assert not_a_folder.stderr.splitlines()[-1].startswith("error: --out="), not_a_folder.stderr


def test_two_processes_match_one(conditional_checkpoint, tmp_path, free_port):
  """Two JAX processes (2 CPU devices each) run the CLI together: one set of files, written
  by the first process, with the samples a single process draws."""
  port = free_port
  out = tmp_path / "multi"
  procs = []
  for i in range(2):
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                         JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "diffit_jax.sample", f"--checkpoint={conditional_checkpoint}",
         f"--out={out}", "--num_samples=7", "--batch_size=6", "--labels=cycle", "--seed=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text
  assert "] Wrote " in outs[0] and "] Wrote " not in outs[1]
  images, labels = load(out / "samples_7x16x16x1.npz")
  single = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path / "one"),
                      num_samples=7, batch_size=6, labels="cycle", seed=1)
  want_images, want_labels = load(single)
  np.testing.assert_array_equal(labels, want_labels)
  # 4 devices vs this process's: the same noise, floats equal to ~1e-5, so uint8 pixels
  # may differ by one step where a value sits on a rounding boundary.
  diff = np.abs(images.astype(int) - want_images.astype(int))
  assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
  assert sorted(os.listdir(out / "parts")) == [
      "00000000_00000006.npz", "00000006_00000007.npz", "manifest.json"]


def tiny_latent_config(num_classes=5):
  """configs/imagenet256_latent.py (ADM) with a 1-block network on 8x8 latents, 3 steps."""
  cfg = load_config(os.path.join(REPO, "configs", "imagenet256_latent.py"))
  cfg.model.update(TINY_LATENT_MODEL, depth=1, num_classes=num_classes)
  cfg.sampler.num_steps = 3
  return cfg


def test_latent_model_decodes_through_the_vae(tmp_path):
  write_tiny_vae(tmp_path / "vae")
  ckpt = write_checkpoint(tmp_path / "diffit", tiny_latent_config())
  with pytest.raises(ValueError, match="need the SD VAE"):
    sample.run(None, checkpoint_path=ckpt, out=str(tmp_path / "s"))
  path = sample.run(None, checkpoint_path=ckpt, vae=str(tmp_path / "vae"), out=str(tmp_path / "s"),
                    num_samples=3, batch_size=2, seed=0)
  images, labels = load(path)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8  # 8x8 latents, VAE x2
  assert labels.min() >= 0 and labels.max() < 5


def test_parts_of_older_weights_are_not_reused(tmp_path):
  """Training went on from step 20 to 30: the same command must draw from the step-30
  weights, not join the step-20 batches it finds in OUT/parts."""
  cfg = tiny_config(TWO_STAGES)
  workdir, out = tmp_path / "run", tmp_path / "eval"
  write_train_checkpoint(workdir, cfg, step=20, seed=0)
  flags = [f"--config={write_config_file(tmp_path / 'tiny.py', cfg)}", f"--workdir={workdir}",
           f"--out={out}", "--num_samples=3", "--batch_size=2", "--labels=cycle"]
  first = run_cli(*flags)
  assert first.returncode == 0, first.stderr
  step20, _ = load(out / "samples_3x16x16x1.npz")
  write_train_checkpoint(workdir, cfg, step=30, seed=1)
  second = run_cli(*flags)
  assert second.returncode == 0, second.stderr
  step30, _ = load(out / "samples_3x16x16x1.npz")
  assert not np.array_equal(step30, step20)
  want = sample.run(cfg, workdir=str(workdir), out=str(tmp_path / "fresh"), num_samples=3,
                    batch_size=2, labels="cycle")
  np.testing.assert_array_equal(step30, load(want)[0])
  assert "starting over" in second.stderr, second.stderr
  assert "checkpoint_step: 20 there, 30 now" in second.stderr and "weights_sha256" in second.stderr


def test_workdir_config_is_the_one_the_run_saved(tmp_path):
  """`--workdir` alone samples with WORKDIR/config.json, exactly as with --config."""
  cfg = tiny_config(TWO_STAGES)
  workdir = tmp_path / "run"
  write_train_checkpoint(workdir, cfg, step=2, seed=0)
  common = dict(workdir=str(workdir), num_samples=2, batch_size=2, labels="cycle")
  with pytest.raises(ValueError, match="has no config.json"):
    sample.run(None, out=str(tmp_path / "none"), **common)
  (workdir / "config.json").write_text(json.dumps(cfg.to_dict()))
  saved = load(sample.run(None, out=str(tmp_path / "saved"), **common))[0]
  given = load(sample.run(cfg, out=str(tmp_path / "given"), **common))[0]
  np.testing.assert_array_equal(saved, given)


def test_damaged_parts_are_recomputed(conditional_checkpoint, tmp_path):
  """A resume after a kill finds a truncated, an empty and a wrong-sized part: each is
  named, recomputed, and the result is bitwise a clean run's."""
  clean = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path / "clean"),
                     num_samples=7, batch_size=2, labels="cycle", seed=1)
  out = tmp_path / "resumed"
  flags = [f"--checkpoint={conditional_checkpoint}", f"--out={out}", "--num_samples=7",
           "--batch_size=2", "--labels=cycle", "--seed=1"]
  assert run_cli(*flags).returncode == 0
  os.remove(out / "samples_7x16x16x1.npz")  # as if killed before joining the parts
  parts = sorted(p for p in os.listdir(out / "parts") if p.endswith(".npz"))
  assert len(parts) == 4
  with open(out / "parts" / parts[1], "r+b") as f:
    f.truncate(os.path.getsize(out / "parts" / parts[1]) // 2)
  open(out / "parts" / parts[2], "wb").close()
  np.savez(out / "parts" / parts[3], images=np.zeros((5, 16, 16, 1), np.uint8),
           labels=np.zeros(5, np.int32))
  mtime = os.path.getmtime(out / "parts" / parts[0])
  resumed = run_cli(*flags)
  assert resumed.returncode == 0, resumed.stderr
  assert "Traceback" not in resumed.stderr
  for bad in parts[1:]:
    assert f"{bad} is unreadable or incomplete" in resumed.stderr, resumed.stderr
  assert resumed.stderr.count("recomputing") == 3
  assert os.path.getmtime(out / "parts" / parts[0]) == mtime  # the good part is kept
  for got, want in zip(load(out / "samples_7x16x16x1.npz"), load(clean)):
    np.testing.assert_array_equal(got, want)


def tiny_latent(tmp_path, num_classes=5):
  """(config, checkpoint, vae): a 1-block latent DiffiT (ADM) and a tiny VAE, both random."""
  write_tiny_vae(tmp_path / "vae")
  cfg = tiny_latent_config(num_classes)
  cfg.vae = str(tmp_path / "vae")
  return cfg, write_checkpoint(tmp_path / "diffit", cfg), str(tmp_path / "vae")


def test_fid_hook_images_are_the_sample_commands(tmp_path):
  """The trainer's periodic FID and `sample` draw the same uint8 images from the same
  weights, seed and labels (a latent model: ADM's truncation to uint8, through the VAE)."""
  from diffit_jax import ema_samples, inference, train
  from diffit_jax import sharding as sharding_lib
  cfg, ckpt, _ = tiny_latent(tmp_path)
  cfg.eval.update(num_samples=5, batch_size=4)
  step = 7
  mesh = sharding_lib.create_mesh(cfg.mesh)
  setup, _ = train.create_train_state(cfg, mesh, initialize=False)
  pipeline = inference.Pipeline(cfg, mesh=mesh, graphdef=setup.graphdef, require_vae=False)
  ema_params = jax.device_put(random_params(cfg), sharding_lib.replicated(mesh))
  seen = []

  def evaluator(batches, total, precision_recall):
    seen.append(np.concatenate(list(batches)))
    return {"fid": 1.0}

  assert ema_samples.evaluate_fid(cfg, pipeline, ema_params, step, evaluator) == {"eval/fid": 1.0}
  path = sample.run(None, checkpoint_path=ckpt, out=str(tmp_path / "s"), num_samples=5,
                    batch_size=4, labels="random", seed=ema_samples.FID_SEED + step)
  images, _ = load(path)
  assert seen[0].dtype == np.uint8 and seen[0].shape == images.shape == (5, 16, 16, 3)
  np.testing.assert_array_equal(seen[0], images)


def test_respacing_flag_picks_adms_ddim_steps(tmp_path):
  cfg, ckpt, _ = tiny_latent(tmp_path)
  common = dict(checkpoint_path=ckpt, num_samples=2, batch_size=2, labels="cycle")
  ddim5 = load(sample.run(None, out=str(tmp_path / "ddim5"),
                          sampler_overrides={"respacing": "ddim5"}, **common))[0]
  with open(tmp_path / "ddim5" / "parts" / "manifest.json") as f:
    assert json.load(f)["sampler"]["respacing"] == "ddim5"
  # --num_steps=5 keeps ADM's "5" ({0, 250, 500, 749, 999}), ddim5 the stride {0, 200, ...}.
  five = load(sample.run(None, out=str(tmp_path / "five"), sampler_overrides={"num_steps": 5},
                         **common))[0]
  assert not np.array_equal(ddim5, five)
  with pytest.raises(ValueError, match="not both"):
    sample.run(None, out=str(tmp_path / "x"),
               sampler_overrides={"num_steps": 5, "respacing": "ddim5"}, **common)
  image_ckpt = write_checkpoint(tmp_path / "image", tiny_config(TWO_STAGES))
  with pytest.raises(ValueError, match="EDM model samples on its own sigma grid"):
    sample.run(None, checkpoint_path=image_ckpt, out=str(tmp_path / "y"),
               sampler_overrides={"respacing": "ddim5"})


def test_cli_grid_scale_and_progress_lines(conditional_checkpoint, tmp_path):
  from PIL import Image
  result = run_cli(f"--checkpoint={conditional_checkpoint}", f"--out={tmp_path / 'auto'}",
                   "--num_samples=7", "--batch_size=3", "--num_steps=1")
  assert result.returncode == 0, result.stderr
  # 16 px samples, 3x3 cells with 2 px gaps = 56 px, drawn 4x so a sample is 64 px wide.
  assert Image.open(tmp_path / "auto" / "grid.png").size == (224, 224)
  # Log lines: `I0101 12:00:00.000000 123 sample.py:260] batch 3/3 | ...`.
  lines = [l.split("] ", 1)[1] for l in result.stderr.splitlines() if "] batch " in l]
  assert len(lines) == 3 and lines[-1].startswith("batch 3/3 | "), result.stderr
  assert "img/s" in lines[-1] and "ETA" in lines[-1] and "7/7 images" in lines[-1]
  path = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path / "one"),
                    num_samples=7, batch_size=3, grid_scale=1,
                    sampler_overrides={"num_steps": 1})
  assert Image.open(os.path.join(os.path.dirname(path), "grid.png")).size == (56, 56)


def test_runlocal_shrinks_only_the_training_grids():
  """A `:runlocal` run's saved config.sampler is what `sample --workdir` should use."""
  from diffit_jax.diffusion import SamplerConfig
  for name, steps in (("mnist_demo", 12), ("cifar10", 18), ("ffhq64", 40),
                      ("imagenet256_latent", 250), ("imagenet512_latent", 250)):
    full = load_config(os.path.join(REPO, "configs", f"{name}.py"))
    local = load_config(os.path.join(REPO, "configs", f"{name}.py:runlocal"))
    assert local.sampler.to_dict() == full.sampler.to_dict(), name
    assert SamplerConfig.from_config(local).steps == steps, name
    assert 0 < local.sample_grid.num_steps < steps, name


# ----------------------------------------------------------------------------------------
# The disk it shares: another sampler, a damaged manifest, a full disk.


def test_an_out_another_sampler_writes_is_refused(conditional_checkpoint, tmp_path):
  """A live process holding --out's lock (here a child that took it and waits): the
  command says who, exits 2 and writes nothing; once that process is gone it samples."""
  out = tmp_path / "out"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from diffit_jax import files; "
       f"files.FolderLock({str(out / files.LOCK_FILE)!r}, what='sampler', advice='-').acquire(); "
       "print('held', flush=True); time.sleep(600)"],
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    flags = [f"--checkpoint={conditional_checkpoint}", f"--out={out}", "--num_samples=3",
             "--batch_size=3"]
    refused = run_cli(*flags)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert f"pid {holder.pid} on host" in error and "pass another --out" in error, error
    assert sorted(os.listdir(out)) == [files.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()
  done = run_cli(*flags)
  assert done.returncode == 0, done.stderr
  assert "Taking over" in done.stderr and f"pid {holder.pid}" in done.stderr, done.stderr
  assert sorted(os.listdir(out)) == ["grid.png", "parts", "samples_3x16x16x1.npz"]  # released


def test_a_damaged_manifest_sets_its_parts_aside(conditional_checkpoint, tmp_path):
  """A manifest that does not parse cannot say what drew the parts beside it: they are
  moved aside (not reused, not deleted), one line says so, and sampling starts over."""
  out = tmp_path / "out"
  flags = [f"--checkpoint={conditional_checkpoint}", f"--out={out}", "--num_samples=5",
           "--batch_size=2", "--labels=cycle", "--seed=3"]
  assert run_cli(*flags).returncode == 0
  first = load(out / "samples_5x16x16x1.npz")
  parts = sorted(os.listdir(out / "parts"))
  (out / "parts" / sample.MANIFEST).write_text('{"checkpoint_step": nul')
  again = run_cli(*flags)
  assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
  (line,) = [line for line in again.stderr.splitlines() if "manifest.json is damaged" in line]
  assert "parts.unverified" in line and "3 batches" in line, line
  assert sorted(os.listdir(out / "parts.unverified")) == parts  # kept as they were
  for got, want in zip(load(out / "samples_5x16x16x1.npz"), first):
    np.testing.assert_array_equal(got, want)


FULL_OUT_SCRIPT = r"""
fill 20
"$PYTHON" -m diffit_jax.sample "$@" --out="$MNT/out" > "$OUT/full.txt" 2>&1; echo "full rc=$?"
ls -a "$MNT/out/parts"
rm "$MNT/filler"
"$PYTHON" -m diffit_jax.sample "$@" --out="$MNT/out" > "$OUT/freed.txt" 2>&1; echo "freed rc=$?"
cp "$MNT/out/samples_24x16x16x1.npz" "$OUT/"
"""


def test_a_full_disk_stops_sampling_with_one_line_and_it_resumes(conditional_checkpoint,
                                                                tmp_path, run_on_small_disk):
  """--out on a real tmpfs with 20 KB free: the parts that fit are kept, the one that does
  not is named with the space it needed, nothing half-written stays, and once space is
  freed the same command finishes with the samples of a run that never stopped."""
  if run_on_small_disk is None:
    pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
  flags = [f"--checkpoint={conditional_checkpoint}", "--num_samples=24", "--batch_size=4",
           "--labels=cycle", "--seed=2"]
  script = FULL_OUT_SCRIPT.replace('"$@"', " ".join(flags))
  env = subprocess_env(PYTHON=sys.executable, OUT=str(tmp_path))
  proc = run_on_small_disk(script, tmp_path / "mnt", 1024, env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  full = (tmp_path / "full.txt").read_text()
  assert "full rc=2" in proc.stdout and "Traceback" not in full, (proc.stdout, full)
  (error,) = [line for line in full.splitlines() if line.startswith("error:")]
  assert "out of space writing" in error and "/parts/" in error and "needs about" in error
  listing = proc.stdout.split("full rc=2")[1].split("freed rc=")[0].split()
  assert ".tmp" not in " ".join(listing) and 1 <= len(listing) - 3 < 6, listing  # some parts
  assert "freed rc=0" in proc.stdout, (tmp_path / "freed.txt").read_text()
  clean = sample.run(None, checkpoint_path=conditional_checkpoint, out=str(tmp_path / "clean"),
                     num_samples=24, batch_size=4, labels="cycle", seed=2)
  for got, want in zip(load(tmp_path / "samples_24x16x16x1.npz"), load(clean)):
    np.testing.assert_array_equal(got, want)


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_line(tmp_path):
  """One metadata check (`checkpoint.load_metadata(path, kind=...)`) behind every reader:
  a VAE where a DiffiT is needed, and a DiffiT where a VAE is, each refused through the
  real CLIs with one line naming the kind found and the command that writes the right one."""
  from diffit_jax import finetune, inference
  _, ckpt, vae = tiny_latent(tmp_path)
  convert = lambda *flags: run_module("diffit_jax.convert", *flags)
  for result in [run_cli(f"--checkpoint={vae}", f"--out={tmp_path / 's'}"),
                 convert("export", f"--src={vae}", f"--out={tmp_path / 'e.safetensors'}")]:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.splitlines()[-1]
    assert f"{vae} holds a 'vae' checkpoint, not a DiffiT network" in line, result.stderr
    assert "python -m diffit_jax.convert diffit" in line, result.stderr
  assert not os.path.exists(tmp_path / "e.safetensors")
  wrong_vae = run_cli(f"--checkpoint={ckpt}", f"--vae={ckpt}", f"--out={tmp_path / 's'}")
  assert wrong_vae.returncode == 2 and "Traceback" not in wrong_vae.stderr, wrong_vae.stderr
  line = wrong_vae.stderr.splitlines()[-1]
  assert f"{ckpt} holds a 'diffit' checkpoint, not a VAE" in line, wrong_vae.stderr
  assert "python -m diffit_jax.convert vae" in line, wrong_vae.stderr
  # The library readers give the same message.
  with pytest.raises(checkpoint.WrongCheckpointError, match="holds a 'vae' checkpoint"):
    inference.load(checkpoint=vae)
  with pytest.raises(finetune.IncompatibleSourceError,
                     match=f"config.init_from={vae}: .*holds a 'vae' checkpoint"):
    finetune.read_source(vae)
  no_config = str(tmp_path / "no_config")
  checkpoint.save_weights(no_config, {"w": np.zeros(2)}, metadata={"kind": "diffit"})
  with pytest.raises(ValueError, match="carries no config"):
    sample.run(None, checkpoint_path=no_config, out=str(tmp_path / "s"))
