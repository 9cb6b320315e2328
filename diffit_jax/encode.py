"""`python -m diffit_jax.encode`: pre-encode an image dataset into SD-VAE posterior records.

    python -m diffit_jax.encode --vae=ckpt/sd_vae_ema --data=tfds:imagenet2012 \\
        --resolution=256 --out=data/in256_latents [--manual_dir=...] [--batch_size=64]

Latent DiffiT trains on VAE latents. Encoding once, up front, stores for every image and
its horizontal mirror the diagonal Gaussian posterior (mean, log-variance) in the record
format of `diffit_jax.data.latents`; training then draws a fresh latent from the stored
posterior each time (times 0.18215), so flips and the encoder's noise stay free.

Images get ADM's center crop to `--resolution`. The work is split over processes (each
process takes every process_count-th record and writes its own shard file, so no two
writers touch one file) and, within a process, over its local devices (a data-parallel
mesh of them: the batch is split, the VAE is replicated). A shard file appears only when its
writer finishes; an interrupted encode is rerun from the start.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh

from diffit_jax import cli, sharding
from diffit_jax.data import latents as latents_lib
from diffit_jax.data import pipeline, transforms


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the command's flags in `flag_values`."""
  fv = flag_values
  flags.DEFINE_string("vae", None, "A converted VAE (python -m diffit_jax.convert vae).",
                      flag_values=fv)
  flags.DEFINE_string("data", None, "Image data: tfds:NAME, folder:DIR or mnist_demo.",
                      flag_values=fv)
  flags.DEFINE_integer("resolution", 256, "Center-crop size of the images (latents are /8).",
                       lower_bound=8, flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder for the latent shards.", flag_values=fv)
  flags.DEFINE_string("split", "train", "tfds split.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data_dir.", flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "tfds manual_dir (imagenet2012).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images per VAE call on this process.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of the "
                    "posteriors.", flag_values=fv)
  flags.DEFINE_integer("limit", 0, "Encode only the first N records (0: all).", flag_values=fv)


def make_encoder(vae_path: str, mesh: Mesh):
  """A jitted (B, H, W, 3) [-1, 1] batch -> (mean, logvar), each (B, 2, h, w, 4)."""
  from diffit_jax.convert.vae import load_vae
  vae = load_vae(vae_path, sharding=sharding.replicated(mesh))
  graphdef, state = nnx.split(vae)
  batch_sharding = sharding.batch_sharding(mesh)
  encode = vae_encoder(graphdef)
  return lambda images: encode(state, jax.device_put(images, batch_sharding))


def vae_encoder(graphdef: nnx.GraphDef):
  """The jitted `encode(vae_state, images) -> (mean, logvar)` of an SD VAE's `graphdef`:
  each image and its mirror image, (B, H, W, 3) in [-1, 1] -> each (B, 2, h, w, 4)."""

  @jax.jit
  def encode(state, images):
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)  # (2B, H, W, 3): image, mirror
    mean, logvar = nnx.merge(graphdef, state).encode(both)  # each (2B, h, w, 4)
    split = lambda a: a.reshape((2, -1) + a.shape[1:]).swapaxes(0, 1)  # (B, 2, h, w, 4)
    return split(mean), split(logvar)

  return encode


def encode_dataset(data_config: ml_collections.ConfigDict, vae_path: str, dst: str, *,
                   batch_size: int = 64, dtype: str = "float16", limit: int = 0) -> int:
  """Encodes this process's share of the records; returns how many it wrote."""
  source, info = pipeline.create_data_source(data_config)
  total = min(info.num_examples, limit) if limit else info.num_examples
  process, num_processes = jax.process_index(), jax.process_count()
  indices = np.arange(process, total, num_processes)
  mesh = sharding.create_mesh(devices=jax.local_devices())  # each process encodes alone
  batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the local devices
  encode = make_encoder(vae_path, mesh)
  prepare = pipeline.PrepareImage(data_config.image_size, 3)

  writer = latents_lib.LatentShardWriter(dst, process, num_processes)
  t0 = time.time()
  try:
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      records = [prepare.map(source[int(i)]) for i in chunk]
      images = np.stack([r["image"] for r in records])  # (b, S, S, 3) uint8
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(chunk), 0)])
      mean, logvar = encode(transforms.uint8_to_unit_range(images))
      mean = np.asarray(mean, dtype)[:len(chunk)]
      logvar = np.asarray(logvar, dtype)[:len(chunk)]
      for m, lv, r in zip(mean, logvar, records):
        writer.write(m, lv, int(r["label"]))
      done = start + len(chunk)
      rate = done / (time.time() - t0)
      logging.info("Process %d: %d/%d images, %.1f img/s, ETA %.0f s", process, done,
                   len(indices), rate, (len(indices) - done) / rate)
  except BaseException:
    writer.abort()  # never leave a shard that looks complete
    raise
  writer.close()
  if process == 0:
    latents_lib.write_info(dst, num_classes=info.num_classes, class_names=list(info.class_names),
                           source=data_config.name, image_size=data_config.image_size,
                           vae=vae_path, num_examples=int(total))
  return len(indices)


def run(args: flags.FlagValues) -> None:
  """The command: encodes the data the parsed flags `args` name."""
  missing = [name for name in ("vae", "data", "out") if not args[name].value]
  if missing:
    raise cli.UsageError(f"--{', --'.join(missing)} required.")
  data_config = pipeline.get_default_data_config()
  data_config.update(name=args.data, image_size=args.resolution, channels=3, split=args.split,
                     data_dir=args.data_dir, manual_dir=args.manual_dir)
  n = encode_dataset(data_config, args.vae, args.out, batch_size=args.batch_size,
                     dtype=args.dtype, limit=args.limit)
  print(f"wrote {n} records to {args.out}; train with --config.data.name=latents:{args.out}")


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  return cli.run_command(argv, prog="python -m diffit_jax.encode", doc=__doc__,
                         define_flags=define_flags, run=run)


if __name__ == "__main__":
  sys.exit(main())
