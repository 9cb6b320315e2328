"""`python -m diffit_jax.data {build,info}`: build a dataset from images, inspect one.

    python -m diffit_jax.data build --src=IMAGES --out=DATASET [--resolution=64] [--strict]
        [--name=NAME] [--channels=3] [--unconditional] [--allow_upscale] [--overwrite]
    python -m diffit_jax.data build --src=cifar-10-python.tar.gz --out=data/cifar10 \\
        [--split=test]
    python -m diffit_jax.data info --src=DATASET

`build` reads a folder of images (class sub-folders are labels) or the official CIFAR-10
tarball (`cifar-10-python.tar.gz`, labels included; no TensorFlow needed), prints what it
wrote, each skipped image or entry (special files, broken symlinks and symlink loops are never
opened) with its reason, and the classes; train on the result with
`--config.data.name=folder:DATASET`. `info` describes a built image dataset or a latent
dataset from `python -m diffit_jax.encode`. Exit status: 0 ok; 2 for an error the user can
fix (a bad flag, a missing source, an existing --out, a rejected build), reported as an
`error: ...` line on stderr.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from diffit_jax import cli, files

BUILD_DOC = """Builds an ArrayRecord dataset from a folder of images or cifar-10-python.tar.gz.

  python -m diffit_jax.data build --src=IMAGES --out=DATASET [--resolution=64]
  python -m diffit_jax.data build --src=cifar-10-python.tar.gz --out=data/cifar10
"""
INFO_DOC = """Describes a built image dataset or a latent dataset: python -m diffit_jax.data info --src=DIR
"""


def define_build_flags(flag_values: flags.FlagValues) -> None:
  """The flags of `data build`."""
  fv = flag_values
  flags.DEFINE_string("src", None, "Folder of images (class sub-folders = labels), or the "
                      "official cifar-10-python.tar.gz.", required=True, flag_values=fv)
  flags.DEFINE_string("out", None, "Dataset folder to create.", required=True, flag_values=fv)
  flags.DEFINE_integer("resolution", None, "ADM center-crop every image to RESOLUTION x "
                       "RESOLUTION (default: keep the size, which all images must share).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("strict", False, "Reject the build on any unreadable or odd-sized image, "
                    "or any entry the scan does not read (a FIFO or socket named like an image, "
                    "a broken symlink, a symlink loop); default: skip it by name.",
                    flag_values=fv)
  flags.DEFINE_string("name", None, "Dataset name (default: from --out; cifar10 for the "
                      "tarball).", flag_values=fv)
  flags.DEFINE_integer("channels", 3, "3 = RGB, 1 = grey.", flag_values=fv)
  flags.register_validator("channels", lambda c: c in (1, 3),
                           message="--channels must be 1 (grey) or 3 (RGB)", flag_values=fv)
  flags.DEFINE_bool("unconditional", False, "Do not treat sub-folders as classes (e.g. FFHQ's "
                    "numbered folders).", flag_values=fv)
  flags.DEFINE_bool("allow_upscale", False, "Upscale images smaller than --resolution instead "
                    "of skipping them.", flag_values=fv)
  flags.DEFINE_enum("split", "train", ["train", "test"], "With cifar-10-python.tar.gz: the "
                    "50,000 train images or the 10,000 test images.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=fv)


def build(args: flags.FlagValues) -> int:
  """`data build`: a folder of images or the CIFAR-10 tarball -> a dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from diffit_jax.data import cifar10, folder  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()  # ProgressLines print the build's progress
  tarball = cifar10.is_cifar10_tarball(args.src)  # a damaged tar file: FolderDatasetError
  if tarball:
    ignored = [f"--{name}" for name in ("resolution", "unconditional", "allow_upscale",
                                         "strict") if args[name].present]
    if ignored or args.channels != 3:
      raise cli.UsageError(
          f"{', '.join(ignored) or '--channels'} does not apply to the CIFAR-10 tarball "
          "(32x32 RGB images, labelled); drop it.")
  elif os.path.isfile(args.src):
    raise cli.UsageError(
        f"--src={args.src} is a file but not the official cifar-10-python.tar.gz (it holds no "
        f"{cifar10.ROOT}/{cifar10.META}); pass a folder of images or that tarball.")
  elif args["split"].present:
    raise cli.UsageError(
        "--split applies only to cifar-10-python.tar.gz; a folder build writes every image.")
  # One writer per --out (its lock sits beside it: the dataset folder appears only when
  # complete); a full disk is one line, and the build removes its partial folder.
  out = os.path.abspath(args.out)
  lock = files.FolderLock(f"{out}.lock", what="dataset build", advice="pass another --out")
  with lock, files.writing(out, files.tree_bytes(args.src)):
    if tarball:
      report = cifar10.build_cifar10_dataset(args.src, args.out, split=args.split,
                                             name=args.name, overwrite=args.overwrite)
    else:
      report = folder.build_folder_dataset(
          args.src, args.out, resolution=args.resolution, strict=args.strict, name=args.name,
          channels=args.channels, unconditional=args.unconditional,
          allow_upscale=args.allow_upscale, overwrite=args.overwrite)
  print(report.summary())
  print(f"Train on it with --config.data.name=folder:{report.dataset_dir}")
  return 0


def define_info_flags(flag_values: flags.FlagValues) -> None:
  """The flags of `data info`."""
  flags.DEFINE_string("src", None, "A built dataset (data build) or a latent dataset (encode).",
                      required=True, flag_values=flag_values)


def info(args: flags.FlagValues) -> int:
  """`data info`: describes a built image dataset or a latent dataset."""
  from diffit_jax.data import latents  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(args.src)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    dataset_info = tfds.builder_from_directory(path).info
    print(f"{dataset_info.name} {dataset_info.version} at {path}")
    for split, split_info in dataset_info.splits.items():
      print(f"  split {split}: {split_info.num_examples} examples")
    print(f"  features: {dataset_info.features}")
    metadata = dict(dataset_info.metadata or {})
    skipped = metadata.pop("skipped", [])
    for key, value in sorted(metadata.items()):
      print(f"  {key}: {value}")
    print(f"  skipped at build: {len(skipped)}")
    return 0
  try:
    paths = latents.shard_paths(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"{path} is neither a built dataset (dataset_info.json) nor a complete "
                     f"latent dataset: {e}") from None
  import grain  # pylint: disable=g-import-not-at-top

  source = grain.sources.ArrayRecordDataSource(paths)
  first = latents.decode_record(source[0])
  print(f"latent dataset at {path}: {len(source)} records in {len(paths)} shards")
  print(f"  per record: mean/logvar {first['mean'].shape} {first['mean'].dtype} (image, mirror)")
  for key, value in sorted(latents.read_info(path).items()):
    print(f"  {key}: {value}")
  return 0


COMMANDS = {
    "build": cli.Command("folder of images or cifar-10-python.tar.gz -> ArrayRecord dataset",
                         __name__, "define_build_flags", "build", doc=BUILD_DOC),
    "info": cli.Command("describe a built dataset or a latent dataset", __name__,
                        "define_info_flags", "info", doc=INFO_DOC),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  return cli.run_subcommand(argv, prog="python -m diffit_jax.data", doc=__doc__,
                            commands=COMMANDS)


if __name__ == "__main__":
  sys.exit(main())
