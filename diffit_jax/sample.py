"""`python -m diffit_jax.sample`: draw samples into an ADM-evaluator `.npz` and a PNG grid.

    # EMA weights of the newest training checkpoint in a workdir (with the run's config):
    python -m diffit_jax.sample --workdir=runs/mnist_demo --num_samples=100 \\
        --out=runs/mnist_demo/eval
    # A converted official checkpoint (its config travels with it), decoded by a converted VAE:
    python -m diffit_jax.sample --checkpoint=ckpt/diffit_256 --vae=ckpt/sd_vae_ema \\
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

Sampler, steps and guidance come from `config.sampler` (the paper's settings; a `:runlocal`
config shrinks only the trainer's grids, `config.sample_grid.num_steps`) unless overridden by
flags; `--config.sampler.X=...` overrides work as well. `--num_steps=N` sets the number of
sampler steps (an ADM model's chain is respaced to N evenly spread steps, ADM's "N");
`--respacing` picks the ADM steps otherwise: `ddim25` (DDIM's fixed stride, 25 steps) or
`10,15,20` (per equal section), as ADM's `timestep_respacing`; it replaces --num_steps.
The images are made by `diffit_jax.inference`, as the trainer's grids and periodic FID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import zipfile
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffit_jax import checkpoint, cli, config_lib, files, inference, logging_utils
from diffit_jax import sharding as sharding_lib
from diffit_jax.inference import draw_labels

GRID_CELL_PX = 64  # --grid_scale=0 draws each sample at least this many pixels wide
GRID_MAX_IMAGES = 100


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
  """Defines the command's flags in `flag_values`; `argv` is the command line (the config's
  `--config.a.b=v` overrides are read from it)."""
  fv = flag_values
  config_lib.DEFINE_config_file("config", "Config file (configs/*.py[:arg]). Optional: by "
                                "default the config saved with the run (WORKDIR/config.json) "
                                "or with the --checkpoint.", flag_values=fv, argv=argv,
                                required=False)
  flags.DEFINE_string("workdir", None, "Training workdir: sample with its newest EMA weights.",
                      flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "A converted weights checkpoint "
                      "(python -m diffit_jax.convert diffit).", flag_values=fv)
  flags.DEFINE_string("vae", None, "A converted VAE (python -m diffit_jax.convert vae) to decode "
                      "latents; overrides config.vae. Required for latent models.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples_eval or ./samples).",
                      flag_values=fv)
  flags.DEFINE_integer("num_samples", 64, "Number of samples to write (any number).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Samples per sampler call (global, over all devices).",
                       flag_values=fv)
  flags.DEFINE_string("sampler", None, "Override config.sampler.name (ddpm, ddim, heun, euler, "
                      "dpmpp_2m).", flag_values=fv)
  flags.DEFINE_integer("num_steps", None, "Override config.sampler.num_steps (ADM: the chain "
                       "respaced to this many evenly spread steps).", flag_values=fv)
  flags.DEFINE_string("respacing", None, "ADM models: which steps to keep, as ADM's "
                      "timestep_respacing: 'ddim25' (DDIM's fixed stride) or '10,15,20' (per "
                      "equal section); replaces --num_steps. Sets config.sampler.respacing.",
                      flag_values=fv)
  flags.DEFINE_float("guidance_scale", None, "Override the guidance scale (1 = no guidance).",
                     flag_values=fv)
  flags.DEFINE_string("guidance_schedule", None, "Override the guidance schedule "
                      "(constant, power_cosine).", flag_values=fv)
  flags.DEFINE_string("labels", "random", "'random' (uniform, as the paper's evaluation), "
                      "'cycle' (0, 1, ..., K-1, 0, ...), or a comma-separated list repeated to "
                      "num_samples.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the noise and the random labels.", flag_values=fv)
  flags.DEFINE_string("dry_run_tpu", None, "Print the sampler's and decoder's plan per chip at "
                      "--batch_size on this TPU slice (e.g. v5e-1, v5e-8), compiled by libtpu on "
                      "a machine with no TPU, and exit; --config alone is enough. Needs libtpu "
                      "(docs/performance.md).", flag_values=fv)
  flags.DEFINE_integer("grid_scale", 0, "Draw each pixel of grid.png this many times larger; "
                       f"0: the smallest scale that makes a sample >= {GRID_CELL_PX} px wide.",
                       flag_values=fv)


def weights_digest(tree) -> str:
  """SHA-256 of every array's name, dtype, shape and bytes, on the host.

  All bytes, no subsample: SHA-256 runs at 0.5-2 GB/s on one core, so 1-5 s for the 2.2 GB
  of DiffiT-XL/2 in float32, small beside loading them.
  """
  digest = hashlib.sha256()
  for name, leaf in sorted(inference.flat_dict(tree).items()):
    if isinstance(leaf, jax.Array) and leaf.is_fully_replicated:
      leaf = leaf.addressable_data(0)  # the whole array, also on one of several hosts
    x = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{name}:{x.dtype}:{x.shape};".encode())
    digest.update(x.reshape(-1).view(np.uint8))  # (bytes,)
  return digest.hexdigest()[:16]


MANIFEST = "manifest.json"
RESUME_NOTE = "; it keeps the batches already finished"


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
  damaged = None
  try:
    old = files.read_json(path, advice="")
  except FileNotFoundError:
    old = None
  except (OSError, files.DamagedFileError) as e:
    old, damaged = None, getattr(e, "problem", str(e))
  if old == key:
    return
  parts = sorted(name for name in os.listdir(parts_dir) if name.endswith(".npz"))
  if damaged:
    # Nothing says what drew these batches: they are kept aside, not deleted or reused.
    aside = files.move_aside(parts_dir, "unverified")
    os.makedirs(parts_dir)
    logging.warning("%s; moved the %d batches beside it to %s (delete that folder once you no "
                    "longer need them) and starting over", damaged, len(parts), aside)
  elif parts:
    if isinstance(old, dict):
      was, now = inference.flat_dict(old), inference.flat_dict(key)
      why = [f"{k}: {was.get(k)} there, {now.get(k)} now"
             for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
      why = "; ".join(why[:4]) + (f"; {len(why) - 4} more" if len(why) > 4 else "")
    else:
      why = f"{MANIFEST} is missing"
    logging.warning("%s holds %d batches drawn otherwise (%s): starting over (pass another "
                    "--out to keep them)", parts_dir, len(parts), why)
    for name in parts:
      os.remove(os.path.join(parts_dir, name))
  files.write_json(path, key)


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
        batch_size=64, labels="random", seed=0, sampler_overrides=None,
        grid_scale=0) -> str | None:
  """Samples `num_samples` images; returns the path of the `.npz` written.

  With several processes (`config.distributed` or `JAX_COORDINATOR_ADDRESS`, ...; see
  `sharding.initialize_distributed`) every process runs this with the same arguments; the
  batches are sharded over all their devices, and the first process writes every file
  (the others return None).

  `sampler_overrides` maps `config.sampler` fields ("name", "num_steps", "respacing",
  "guidance.scale", ...) to values (None: keep). Every argument is checked (config,
  sampler, guidance, labels) before any weights load.
  """
  config = inference.resolve_config(config, workdir, checkpoint_path)
  _apply_sampler_overrides(config, dict(sampler_overrides or {}))
  if num_samples < 1 or batch_size < 1:
    raise ValueError("--num_samples and --batch_size must be positive.")
  if grid_scale < 0:
    raise ValueError(f"--grid_scale={grid_scale}: use a positive scale, or 0 for automatic.")
  all_labels = draw_labels(labels, num_samples, config.model.num_classes, seed)

  sharding_lib.initialize_distributed(config)  # several hosts: every process runs this same command
  chief = jax.process_index() == 0  # gathers every batch and writes all files
  out = out or (os.path.join(workdir, "samples_eval") if workdir else "samples")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file; pass a folder for the samples.")
  # One writer per --out: a second sampler into the same folder is refused here.
  with checkpoint.lock_for_run(out, what="sampler", advice="pass another --out"):
    mesh = _sampling_mesh(config)
    graphdef, state = inference.abstract_network(config)
    pipeline = inference.Pipeline(config, mesh=mesh, graphdef=graphdef, vae=vae)
    vae_digest = (weights_digest(nnx.to_pure_dict(pipeline.vae_params))
                  if chief and pipeline.vae_params is not None else None)
    params, step = inference.load_params(workdir, checkpoint_path)
    state = inference.place_params(state, params, workdir or checkpoint_path, config.model.name,
                                   sharding_lib.replicated(pipeline.mesh))
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
          "sampler": dataclasses.asdict(pipeline.sampler.config), "labels": labels, "seed": seed,
          "num_samples": num_samples, "batch_size": batch_size})
      todo = _parts_to_draw([(part_path(a), stop_of(a) - a) for a in starts],
                            pipeline.image_shape,
                            None if all_labels is None else [all_labels[a:stop_of(a)]
                                                             for a in starts])
    del params  # the host copy; the network holds its own
    if jax.process_count() > 1:
      todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
    progress = logging_utils.Progress(int(todo.sum()), batch_size)
    done = 0
    for i, start in enumerate(starts):
      if not todo[i]:
        continue
      stop = stop_of(start)
      images, batch_labels = _draw_batch(pipeline, state, all_labels, start, stop, batch_size,
                                         seed)
      done += 1
      if not chief:
        continue
      _save_part(part_path(start), images, batch_labels)
      line = logging_utils.format_progress(done, progress.total_steps, {}, progress.update(done),
                                           unit=("batch", "batches"))
      logging.info("%s | %d/%d images", line, stop, num_samples)

    path = None
    if chief:
      path = write_samples(out, [part_path(start) for start in starts], num_samples,
                           with_labels=all_labels is not None, grid_scale=grid_scale)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("diffit_jax:sample_done")
    return path


def plan_on_tpu(config, tpu_slice: str, *, workdir=None, checkpoint_path=None, batch_size=64,
                num_samples=0, sampler_overrides=None) -> None:
  """`--dry_run_tpu`: prints the plan per chip of the sampler and decoder at `batch_size` on
  the TPU slice `tpu_slice` (e.g. "v5e-1"), compiled by libtpu on this machine; nothing is
  sampled and no weights are read (a `config` alone is enough)."""
  from diffit_jax import plan  # pylint: disable=g-import-not-at-top
  if config is None:
    config = inference.resolve_config(config, workdir, checkpoint_path)
  _apply_sampler_overrides(config, dict(sampler_overrides or {}))
  if batch_size < 1:
    raise ValueError("--batch_size must be positive.")
  for line in plan.tpu_sampling_report(config, tpu_slice, batch_size, num_samples=num_samples):
    print(line, flush=True)


def _draw_batch(pipeline, state, all_labels, start: int, stop: int, batch_size: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Samples start..stop-1 (images on the host, and their labels)."""
  # Every call has the full batch size (one compilation); the tail is cut off after.
  indices = np.arange(start, start + batch_size)
  labels = None if all_labels is None else np.resize(all_labels, indices.size + start)[start:]
  images = sharding_lib.to_host(pipeline.images(state, labels, indices, seed))
  return images[:stop - start], None if labels is None else labels[:stop - start]


def _save_part(part: str, images: np.ndarray, labels: np.ndarray | None) -> None:
  tmp = part + ".tmp.npz"
  with files.writing(part, images.nbytes, resume=RESUME_NOTE, remove_on_failure=(tmp,)):
    np.savez(tmp, images=images, labels=np.zeros(0) if labels is None else labels)
    os.replace(tmp, part)


def _apply_sampler_overrides(config, overrides: dict) -> None:
  """Sets the `config.sampler` fields of `overrides` ("name", "guidance.scale", ...; None:
  keep); --num_steps means that many evenly spread steps, whatever respacing was set."""
  if overrides.get("num_steps") is not None:
    if overrides.get("respacing") is not None:
      raise ValueError("pass --num_steps (N evenly spread steps) or --respacing (ADM's "
                       "timestep_respacing, e.g. ddim25), not both.")
    overrides["respacing"] = ""
  for key, value in overrides.items():
    if value is not None:
      target = config.sampler.guidance if key.startswith("guidance.") else config.sampler
      target[key.removeprefix("guidance.")] = value


def _sampling_mesh(config) -> Mesh:
  """The run's mesh, or data parallelism over the devices here when it needs more."""
  try:
    return sharding_lib.create_mesh(config.mesh)
  except ValueError as e:  # trained on more devices (config.mesh.fsdp) than this machine has
    logging.warning("%s Sampling data parallel over the %d devices instead.", e,
                    jax.device_count())
    return sharding_lib.create_mesh()


def _parts_to_draw(parts: list[tuple[str, int]], image_shape: tuple[int, ...],
                   labels: list[np.ndarray] | None) -> np.ndarray:
  """Which of the (path, size) parts must be drawn: missing, unreadable or incomplete ones
  (a damaged one is logged and drawn again)."""
  todo = np.ones(len(parts), bool)
  for i, (path, size) in enumerate(parts):
    if not os.path.exists(path):
      continue
    why = check_part(path, (size, *image_shape), None if labels is None else labels[i])
    todo[i] = why is not None
    if why:
      logging.warning("Part %s is unreadable or incomplete (%s): recomputing it", path, why)
  return todo


def write_samples(out: str, parts: list[str], num_samples: int, *, with_labels: bool,
                  grid_scale: int = 0) -> str:
  """Joins the finished batches into the evaluator's `.npz` and writes `grid.png` (the first
  100 samples, each pixel drawn `grid_scale` times larger; 0: automatic)."""
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
  with files.writing(path, images.nbytes, resume=RESUME_NOTE, remove_on_failure=(tmp,)):
    np.savez(tmp, images, label_arr)  # arr_0, arr_1: the ADM evaluator's layout
    os.replace(tmp, path)
  grid = images[:GRID_MAX_IMAGES]
  scale = grid_scale or max(1, math.ceil(GRID_CELL_PX / w))
  logging_utils.save_image_grid(os.path.join(out, "grid.png"), grid,
                                rows=math.ceil(math.sqrt(len(grid))), scale=scale)
  logging.info("Wrote %s", path)
  return path


def from_flags(args: flags.FlagValues) -> None:
  """The command: `run` with the parsed flags `args`."""
  config = args.config
  if config is not None:
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  overrides = {"name": args.sampler, "num_steps": args.num_steps,
               "respacing": args.respacing, "guidance.scale": args.guidance_scale,
               "guidance.schedule": args.guidance_schedule}
  if args.dry_run_tpu:
    jax.config.update("jax_platforms", "cpu")  # the TPU is only compiled for
    plan_on_tpu(config, args.dry_run_tpu, workdir=args.workdir, checkpoint_path=args.checkpoint,
                batch_size=args.batch_size, num_samples=args.num_samples,
                sampler_overrides=overrides)
    return
  run(config, workdir=args.workdir, checkpoint_path=args.checkpoint, vae=args.vae,
      out=args.out, num_samples=args.num_samples, batch_size=args.batch_size,
      labels=args.labels, seed=args.seed, sampler_overrides=overrides,
      grid_scale=args.grid_scale)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  return cli.run_command(argv, prog="python -m diffit_jax.sample", doc=__doc__,
                         define_flags=lambda fv: define_flags(fv, argv), run=from_flags)


if __name__ == "__main__":
  sys.exit(main())
