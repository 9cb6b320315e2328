"""`python -m diffit_jax.sample`: draw samples into an ADM-evaluator `.npz` and a PNG grid.

    # EMA weights of the newest training checkpoint in a workdir:
    python -m diffit_jax.sample --config=configs/mnist_demo.py --workdir=runs/mnist_demo \
        --num_samples=100 --out=runs/mnist_demo/eval
    # A converted official checkpoint (its config travels with it), decoded by a converted VAE:
    python -m diffit_jax.sample --checkpoint=ckpt/diffit_256 --vae=ckpt/sd_vae_ema \
        --num_samples=50000 --batch_size=256 --out=samples/in256

Writes `OUT/samples_{N}x{H}x{W}x{C}.npz` with `arr_0` (N, H, W, C) uint8 and `arr_1` (N,)
int labels (the layout OpenAI's ADM evaluator reads) and `OUT/grid.png`. Batches are kept
in `OUT/parts/` as they finish, so an interrupted run continues where it stopped. The noise
of sample i depends only on (seed, i) and its label on (seed, i) too, so the result does not
depend on the batch size or the number of devices. On several hosts, run the same command
on every host with `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set
(or `--config.distributed.*`): the first process writes the files.

Sampler, steps and guidance come from `config.sampler` (the paper's settings) unless
overridden by flags; `--config.sampler.X=...` overrides work as well.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from diffit_jax import checkpoint, models, train
from diffit_jax.diffusion import samplers
from diffit_jax.sharding import to_host
from diffit_jax.utils import image_grid, save_png, to_uint8

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py). Optional with "
                                  "--checkpoint, whose saved config is used by default.")
  flags.DEFINE_string("workdir", None, "Training workdir: sample with its newest EMA weights.")
  flags.DEFINE_string("checkpoint", None, "A converted weights checkpoint "
                      "(python -m diffit_jax.convert diffit).")
  flags.DEFINE_string("vae", None, "A converted VAE (python -m diffit_jax.convert vae) to decode "
                      "latents; overrides config.vae. Required for latent models.")
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples_eval or ./samples).")
  flags.DEFINE_integer("num_samples", 64, "Number of samples to write (any number).")
  flags.DEFINE_integer("batch_size", 64, "Samples per sampler call (global, over all devices).")
  flags.DEFINE_string("sampler", None, "Override config.sampler.name (ddpm, ddim, heun, euler, "
                      "dpmpp_2m).")
  flags.DEFINE_integer("steps", None, "Override config.sampler.num_steps.")
  flags.DEFINE_float("guidance_scale", None, "Override the guidance scale (1 = no guidance).")
  flags.DEFINE_string("guidance_schedule", None, "Override the guidance schedule "
                      "(constant, power_cosine).")
  flags.DEFINE_string("labels", "random", "'random' (uniform, as the paper's evaluation), "
                      "'cycle' (0, 1, ..., K-1, 0, ...), or a comma-separated list repeated to "
                      "num_samples.")
  flags.DEFINE_integer("seed", 0, "Seed of the noise and the random labels.")


def _flat(tree) -> dict[str, object]:
  # "/"-joined string paths: Orbax restores nnx.List indices as strings, NNX uses ints.
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore_params(abstract_state, params: dict, source: str, model_name: str,
                   sharding: jax.sharding.Sharding):
  """Places loaded parameters into the abstract network state, checking that they fit."""
  want, have = _flat(nnx.to_pure_dict(abstract_state)), _flat(params)
  bad = sorted(k for k in want.keys() & have.keys()
               if tuple(want[k].shape) != tuple(np.shape(have[k])))
  missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  if bad or missing or unexpected:
    lines = [f"  wrong shape {k}: checkpoint {np.shape(have[k])}, config {want[k].shape}"
             for k in bad[:8]]
    lines += [f"  missing {k}" for k in missing[:8]]
    lines += [f"  unexpected {k}" for k in unexpected[:8]]
    raise ValueError(f"the weights in {source} do not match config.model ({model_name}):\n"
                     + "\n".join(lines) + "\nPass the config the weights were trained or "
                     "converted with (or, with --checkpoint, none: the saved one is used).")
  placed = {k: jax.device_put(jnp.asarray(have[k], want[k].dtype), sharding) for k in want}
  nnx.replace_by_pure_dict(abstract_state, jax.tree_util.tree_map_with_path(
      lambda path, _: placed["/".join(str(getattr(k, "key", k)) for k in path)],
      nnx.to_pure_dict(abstract_state)))
  return abstract_state


def resolve_config(config, workdir, checkpoint_path) -> ml_collections.ConfigDict:
  """The experiment config: given, or saved with a converted checkpoint (cheap: no weights)."""
  if bool(workdir) == bool(checkpoint_path):
    raise ValueError("pass exactly one of --workdir (a training run) or --checkpoint "
                     "(a converted weights checkpoint).")
  if config is not None:
    return config
  if workdir:
    raise ValueError("--config is required with --workdir.")
  metadata = checkpoint.load_metadata(checkpoint_path)
  if metadata.get("kind") not in (None, "diffit"):
    raise ValueError(f"{checkpoint_path} holds a {metadata['kind']!r} checkpoint, not a DiffiT "
                     "network.")
  if "config" not in metadata:
    raise ValueError(f"{checkpoint_path} carries no config; pass --config.")
  return ml_collections.ConfigDict(metadata["config"])


def load_sampling_weights(workdir, checkpoint_path) -> dict:
  """Parameters from a training workdir's newest EMA or a converted weights checkpoint."""
  if workdir:
    return checkpoint.load_ema_params(workdir)[0]
  return checkpoint.load_weights(checkpoint_path)[0]


def draw_labels(how: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray | None:
  """The label of every sample, a function of (how, seed, index) only."""
  if num_classes <= 0:
    if how not in ("random", "cycle"):
      raise ValueError("--labels was given but the model is unconditional (num_classes 0).")
    return None
  if how == "random":
    return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)
  if how == "cycle":
    return (np.arange(num_samples) % num_classes).astype(np.int32)
  try:
    chosen = np.array([int(v) for v in how.split(",")], np.int32)
  except ValueError:
    raise ValueError(f"--labels={how!r}: use 'random', 'cycle' or comma-separated class ids.")
  if chosen.min() < 0 or chosen.max() >= num_classes:
    raise ValueError(f"--labels must be class ids in [0, {num_classes}), got {how!r}.")
  return np.resize(chosen, num_samples)


def make_decoder(config, vae_path: str | None, sharding):
  """A jitted map from sampler output to uint8 NHWC images."""
  # The release stores uint8 by truncation of (x + 1) * 127.5; EDM rounds.
  rounding = config.diffusion.name == "edm"
  if config.model.name != "latent":
    return jax.jit(lambda x: to_uint8(x, rounding=rounding))
  if not vae_path:
    raise ValueError("latent samples need the SD VAE to become images: pass --vae=DIR (make "
                     "DIR with `python -m diffit_jax.convert vae --src=sd-vae-ft-ema --dst=DIR`) "
                     "or set config.vae.")
  from diffit_jax.convert.vae import load_vae
  from diffit_jax.models.vae import from_latent
  vae = load_vae(vae_path, sharding=sharding)
  graphdef, state = nnx.split(vae)

  @jax.jit
  def decode(z):
    return to_uint8(nnx.merge(graphdef, state).decode(from_latent(z)), rounding=rounding)
  return decode


def run(config, *, workdir=None, checkpoint_path=None, vae=None, out=None, num_samples=64,
        batch_size=64, labels="random", seed=0, sampler_overrides=None) -> str | None:
  """Samples `num_samples` images; returns the path of the `.npz` written.

  With several processes (`config.distributed` or `JAX_COORDINATOR_ADDRESS`, ...; see
  `train.initialize_distributed`) every process runs this with the same arguments; the
  batches are sharded over all their devices, and the first process writes every file
  (the others return None).

  Every argument is checked (config, sampler, guidance, labels) before any weights load.
  """
  config = resolve_config(config, workdir, checkpoint_path)
  for key, value in (sampler_overrides or {}).items():
    if value is not None:
      target = config.sampler.guidance if key.startswith("guidance.") else config.sampler
      target[key.removeprefix("guidance.")] = value
  if num_samples < 1 or batch_size < 1:
    raise ValueError("--num_samples and --batch_size must be positive.")
  all_labels = draw_labels(labels, num_samples, config.model.get("num_classes", 0), seed)

  train.initialize_distributed(config)  # several hosts: every process runs this same command
  chief = jax.process_index() == 0  # gathers every batch and writes all files
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0))))
  apply_fn = lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y)
  scfg = train.sampler_config(config)
  sampler = samplers.make_sampler(scfg, apply_fn, models.input_shape(config.model)[1:], mesh=mesh)

  decode = make_decoder(config, vae or config.get("vae"), replicated)
  state = restore_params(state, load_sampling_weights(workdir, checkpoint_path),
                         workdir or checkpoint_path, config.model.name, replicated)
  out = out or (os.path.join(workdir, "samples_eval") if workdir else "samples")
  parts_dir = os.path.join(out, "parts")
  if chief:
    os.makedirs(parts_dir, exist_ok=True)

  # Batches already on disk (from an interrupted run with the same settings) are kept.
  settings = repr((scfg, labels, seed, batch_size, os.path.abspath(workdir or checkpoint_path)))
  tag = f"{scfg.name}{scfg.num_steps}_{hashlib.sha1(settings.encode()).hexdigest()[:10]}"
  starts = range(0, num_samples, batch_size)
  part_path = lambda start: os.path.join(
      parts_dir, f"{tag}_{start:08d}_{min(start + batch_size, num_samples):08d}.npz")
  # What is left to do is the chief's view of the folder, so that every process runs the
  # same batches (each is a collective computation).
  todo = np.array([not os.path.exists(part_path(start)) for start in starts])
  if jax.process_count() > 1:
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  t0, done = time.time(), 0
  for i, start in enumerate(starts):
    if not todo[i]:
      continue
    stop = min(start + batch_size, num_samples)
    # Every call has the full batch size (one compilation); the tail is cut off after.
    indices = np.arange(start, start + batch_size)
    batch_labels = None if all_labels is None else np.resize(all_labels, indices.size + start)[start:]
    images = to_host(decode(sampler(state, batch_labels, indices, seed)))[:stop - start]
    batch_labels = None if batch_labels is None else batch_labels[:stop - start]
    done += stop - start
    if not chief:
      continue
    part = part_path(start)
    tmp = part + ".tmp.npz"
    np.savez(tmp, images=images, labels=np.zeros(0) if batch_labels is None else batch_labels)
    os.replace(tmp, part)
    rate = done / (time.time() - t0)
    left = (num_samples - stop) / rate if rate > 0 else float("nan")
    print(f"[sample] batch {i + 1}/{len(starts)}: {stop}/{num_samples} images, "
          f"{rate:.2f} img/s, ETA {left:.0f} s", flush=True)

  path = None
  if chief:
    path = write_samples(out, [part_path(start) for start in starts], num_samples,
                         with_labels=all_labels is not None)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("diffit_jax:sample_done")
  return path


def write_samples(out: str, parts: list[str], num_samples: int, *, with_labels: bool) -> str:
  """Joins the finished batches into the evaluator's `.npz` and writes `grid.png`."""
  images, label_list = [], []
  for part in parts:
    with np.load(part) as f:
      images.append(f["images"])
      label_list.append(f["labels"])
  images = np.concatenate(images)
  label_arr = (np.concatenate(label_list).astype(np.int64) if with_labels
               else np.zeros(num_samples, np.int64))
  n, h, w, c = images.shape
  path = os.path.join(out, f"samples_{n}x{h}x{w}x{c}.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, images, label_arr)  # arr_0, arr_1: the ADM evaluator's layout
  os.replace(tmp, path)
  save_png(os.path.join(out, "grid.png"), image_grid(images[:100]))
  print(f"[sample] wrote {path} and {os.path.join(out, 'grid.png')}")
  return path


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-file INFO lines out of the progress
  config = FLAGS.config
  if config is not None:
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  overrides = {"name": FLAGS.sampler, "num_steps": FLAGS.steps,
               "guidance.scale": FLAGS.guidance_scale,
               "guidance.schedule": FLAGS.guidance_schedule}
  try:
    run(config, workdir=FLAGS.workdir, checkpoint_path=FLAGS.checkpoint, vae=FLAGS.vae,
        out=FLAGS.out, num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
        labels=FLAGS.labels, seed=FLAGS.seed, sampler_overrides=overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)  # a user error: the message, not a traceback
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
