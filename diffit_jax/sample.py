"""`python -m diffit_jax.sample`: draw samples into an ADM-evaluator `.npz` and a PNG grid.

    # EMA weights of the newest training checkpoint in a workdir (with the run's config):
    python -m diffit_jax.sample --workdir=runs/mnist_demo --num_samples=100 \
        --out=runs/mnist_demo/eval
    # A converted official checkpoint (its config travels with it), decoded by a converted VAE:
    python -m diffit_jax.sample --checkpoint=ckpt/diffit_256 --vae=ckpt/sd_vae_ema \
        --num_samples=50000 --batch_size=256 --out=samples/in256

Writes `OUT/samples_{N}x{H}x{W}x{C}.npz` with `arr_0` (N, H, W, C) uint8 and `arr_1` (N,)
int labels (the layout OpenAI's ADM evaluator reads) and `OUT/grid.png`. The noise of
sample i depends only on (seed, i) and its label on (seed, i) too, so the result does not
depend on the batch size or the number of devices.

Batches are kept in `OUT/parts/` as they finish, so an interrupted run continues where it
stopped. `OUT/parts/manifest.json` keys them to what drew them: the checkpoint step, a
SHA-256 of the weights used (and of the VAE's), the model and sampler configs, labels, seed,
num_samples and batch_size. A run whose key differs (say, training went on to a newer
checkpoint) starts over: it says what differs and deletes the old parts (to keep those
samples, pass another --out). On a resume every part is read back and checked (a zip
archive of uint8 images of the right shape, this run's labels); a truncated, empty or
wrong part is named and recomputed. On several hosts, run the same command
on every host with `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set
(or `--config.distributed.*`): the first process writes the files.

Sampler, steps and guidance come from `config.sampler` (the paper's settings) unless
overridden by flags; `--config.sampler.X=...` overrides work as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffit_jax import checkpoint, cli, config_lib, models, train
from diffit_jax.diffusion import samplers
from diffit_jax.sharding import initialize_distributed, to_host
from diffit_jax.utils import image_grid, save_png, to_uint8

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing this module is free)."""
  config_lib.DEFINE_config_file("config", "Config file (configs/*.py[:arg]). Optional: by "
                                "default the config saved with the run (WORKDIR/config.json) "
                                "or with the --checkpoint.", required=False)
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
  """The experiment config: given, or the one the run saved (WORKDIR/config.json), or the
  one saved with a converted checkpoint (cheap: no weights are read)."""
  if bool(workdir) == bool(checkpoint_path):
    raise ValueError("pass exactly one of --workdir (a training run) or --checkpoint "
                     "(a converted weights checkpoint).")
  if config is not None:
    return config
  if workdir:
    path = os.path.join(workdir, train.CONFIG_FILE)
    if not os.path.exists(path):
      raise ValueError(f"{workdir} has no {train.CONFIG_FILE} (training writes it when it "
                       "starts); pass --config=THE_RUN'S_CONFIG.")
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  metadata = checkpoint.load_metadata(checkpoint_path)
  if metadata.get("kind") not in (None, "diffit"):
    raise ValueError(f"{checkpoint_path} holds a {metadata['kind']!r} checkpoint, not a DiffiT "
                     "network.")
  if "config" not in metadata:
    raise ValueError(f"{checkpoint_path} carries no config; pass --config.")
  return ml_collections.ConfigDict(metadata["config"])


def load_sampling_weights(workdir, checkpoint_path) -> tuple[dict, int | None]:
  """(params, step): a training workdir's newest EMA and its step, or a converted weights
  checkpoint's parameters and None."""
  if not workdir:
    return checkpoint.load_weights(checkpoint_path)[0], None
  directory = os.path.join(os.path.abspath(workdir), checkpoint.TRAIN_CHECKPOINT_DIR)
  step = None  # none yet: load_ema_params says what is missing
  if os.path.isdir(directory):
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True))
    try:
      step = manager.latest_step()
    finally:
      manager.close()
  # The step is pinned so that a checkpoint finishing meanwhile cannot change it.
  return checkpoint.load_ema_params(workdir, step)[0], step


def weights_digest(tree) -> str:
  """SHA-256 of every array's name, dtype, shape and bytes, on the host.

  All bytes, no subsample: SHA-256 runs at 0.5-2 GB/s on one core, so 1-5 s for the 2.2 GB
  of DiffiT-XL/2 in float32, small beside loading them.
  """
  digest = hashlib.sha256()
  for name, leaf in sorted(_flat(tree).items()):
    if isinstance(leaf, jax.Array) and leaf.is_fully_replicated:
      leaf = leaf.addressable_data(0)  # the whole array, also on one of several hosts
    x = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{name}:{x.dtype}:{x.shape};".encode())
    digest.update(x.reshape(-1).view(np.uint8))  # (bytes,)
  return digest.hexdigest()[:16]


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
  """(decode, vae digest): a jitted map from sampler output to uint8 NHWC images, and the
  `weights_digest` of the VAE it decodes latents with (None for image-space models)."""
  # The release stores uint8 by truncation of (x + 1) * 127.5; EDM rounds.
  rounding = config.diffusion.name == "edm"
  if config.model.name != "latent":
    return jax.jit(lambda x: to_uint8(x, rounding=rounding)), None
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
  return decode, (weights_digest(nnx.to_pure_dict(state))
                  if jax.process_index() == 0 else None)


MANIFEST = "manifest.json"


def prepare_parts(parts_dir: str, key: dict) -> None:
  """Keeps the parts in `parts_dir` only if `key` drew them; else deletes them, saying why.

  Args:
    parts_dir: the folder of finished batches (created if missing).
    key: JSON-serialisable settings that fix the samples (see the module docstring);
      written to `parts_dir/manifest.json`.
  """
  os.makedirs(parts_dir, exist_ok=True)
  key = json.loads(json.dumps(key))  # as it reads back: tuples become lists
  path = os.path.join(parts_dir, MANIFEST)
  try:
    with open(path) as f:
      old = json.load(f)
  except FileNotFoundError:
    old = None
  except (OSError, ValueError):
    old = "unreadable"
  if old == key:
    return
  parts = sorted(name for name in os.listdir(parts_dir) if name.endswith(".npz"))
  if parts:
    if isinstance(old, dict):
      was, now = _flat(old), _flat(key)
      why = [f"{k}: {was.get(k)} there, {now.get(k)} now"
             for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
      why = "; ".join(why[:4]) + (f"; {len(why) - 4} more" if len(why) > 4 else "")
    else:
      why = f"{MANIFEST} is {old or 'missing'}"
    print(f"[sample] {parts_dir} holds {len(parts)} batches drawn otherwise ({why}): "
          "starting over (pass another --out to keep them)", flush=True)
    for name in parts:
      os.remove(os.path.join(parts_dir, name))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(key, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_part(path: str, image_shape: tuple[int, ...], labels: np.ndarray | None) -> str | None:
  """Why the finished batch at `path` cannot be used, or None if it can.

  Args:
    path: a part written by `run`.
    image_shape: (n, H, W, C) of its images.
    labels: its n labels (None: an unconditional model).
  """
  try:
    with np.load(path) as f:
      images, got = f["images"], f["labels"]
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
    return f"{type(e).__name__}: {e}"
  if images.dtype != np.uint8 or images.shape != tuple(image_shape):
    return f"images {images.dtype} {images.shape}, expected uint8 {tuple(image_shape)}"
  if not np.array_equal(got, np.zeros(0) if labels is None else labels):
    return "labels other than this run's"
  return None


def run(config, *, workdir=None, checkpoint_path=None, vae=None, out=None, num_samples=64,
        batch_size=64, labels="random", seed=0, sampler_overrides=None) -> str | None:
  """Samples `num_samples` images; returns the path of the `.npz` written.

  With several processes (`config.distributed` or `JAX_COORDINATOR_ADDRESS`, ...; see
  `sharding.initialize_distributed`) every process runs this with the same arguments; the
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

  initialize_distributed(config)  # several hosts: every process runs this same command
  chief = jax.process_index() == 0  # gathers every batch and writes all files
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0))))
  apply_fn = lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y)
  scfg = train.sampler_config(config)
  sampler = samplers.make_sampler(scfg, apply_fn, models.input_shape(config.model)[1:], mesh=mesh)

  out = out or (os.path.join(workdir, "samples_eval") if workdir else "samples")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file; pass a folder for the samples.")
  decode, vae_digest = make_decoder(config, vae or config.get("vae"), replicated)
  params, step = load_sampling_weights(workdir, checkpoint_path)
  state = restore_params(state, params, workdir or checkpoint_path, config.model.name, replicated)
  parts_dir = os.path.join(out, "parts")
  starts = range(0, num_samples, batch_size)
  stop_of = lambda start: min(start + batch_size, num_samples)
  part_path = lambda start: os.path.join(parts_dir, f"{start:08d}_{stop_of(start):08d}.npz")
  # What is left to do is the chief's view of the folder, so that every process runs the
  # same batches (each is a collective computation).
  todo = np.ones(len(starts), bool)
  if chief:
    prepare_parts(parts_dir, {
        "checkpoint_step": step, "weights_sha256": weights_digest(params),
        "vae_sha256": vae_digest, "model": config.model.to_dict(),
        "sampler": dataclasses.asdict(scfg), "labels": labels, "seed": seed,
        "num_samples": num_samples, "batch_size": batch_size})
    image_shape = jax.eval_shape(decode, jax.ShapeDtypeStruct(
        models.input_shape(config.model), jnp.float32)).shape[1:]
    for i, start in enumerate(starts):
      if not os.path.exists(part_path(start)):
        continue
      why = check_part(part_path(start), (stop_of(start) - start, *image_shape),
                       None if all_labels is None else all_labels[start:stop_of(start)])
      todo[i] = why is not None
      if why:
        print(f"[sample] part {part_path(start)} is unreadable or incomplete ({why}): "
              "recomputing it", flush=True)
  del params  # the host copy; the network holds its own
  if jax.process_count() > 1:
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  t0, done = time.time(), 0
  for i, start in enumerate(starts):
    if not todo[i]:
      continue
    stop = stop_of(start)
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
  except (ValueError, OSError) as e:  # a bad flag or file, a missing checkpoint, a full disk
    sys.exit(cli.report_user_error(e))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_absl_flags)
