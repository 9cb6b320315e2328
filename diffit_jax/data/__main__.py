"""`python -m diffit_jax.data {build,info}`: build a dataset from a folder of images, inspect one.

  python -m diffit_jax.data build --src=IMAGES --dst=DATASET [--resolution=64] [--strict]
      [--name=NAME] [--channels=3] [--unconditional] [--allow_upscale] [--overwrite]
  python -m diffit_jax.data info DATASET

`build` prints what it wrote, each skipped image with its reason, and the classes; train on
the result with `--config.data.name=folder:DATASET`. `info` describes a built image dataset
or a latent dataset from `python -m diffit_jax.encode`. Exit status: 0 ok; 2 for an error the
user can fix (a bad argument, a missing source, an existing --dst, a rejected build), reported
as an `error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffit_jax import cli


def _build(args: argparse.Namespace) -> int:
  from diffit_jax.data import folder  # pylint: disable=g-import-not-at-top

  try:
    report = folder.build_folder_dataset(
        args.src, args.dst, resolution=args.resolution, strict=args.strict, name=args.name,
        channels=args.channels, unconditional=args.unconditional,
        allow_upscale=args.allow_upscale, overwrite=args.overwrite)
  except (folder.FolderDatasetError, FileNotFoundError, FileExistsError, PermissionError,
          ValueError) as e:
    return cli.report_user_error(e)
  print(report.summary())
  print(f"Train on it with --config.data.name=folder:{report.dataset_dir}")
  return 0


def _info(args: argparse.Namespace) -> int:
  from diffit_jax.data import latents  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(args.path)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    info = tfds.builder_from_directory(path).info
    print(f"{info.name} {info.version} at {path}")
    for split, split_info in info.splits.items():
      print(f"  split {split}: {split_info.num_examples} examples")
    print(f"  features: {info.features}")
    metadata = dict(info.metadata or {})
    skipped = metadata.pop("skipped", [])
    for key, value in sorted(metadata.items()):
      print(f"  {key}: {value}")
    print(f"  skipped at build: {len(skipped)}")
    return 0
  try:
    paths = latents.shard_paths(path)
  except (FileNotFoundError, ValueError) as e:
    return cli.report_user_error(
        f"{path} is neither a built dataset (dataset_info.json) nor a complete latent dataset: {e}")
  import grain  # pylint: disable=g-import-not-at-top

  source = grain.sources.ArrayRecordDataSource(paths)
  first = latents.decode_record(source[0])
  print(f"latent dataset at {path}: {len(source)} records in {len(paths)} shards")
  print(f"  per record: mean/logvar {first['mean'].shape} {first['mean'].dtype} (image, mirror)")
  for key, value in sorted(latents.read_info(path).items()):
    print(f"  {key}: {value}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m diffit_jax.data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  b = sub.add_parser("build", help="folder of images -> ArrayRecord tfds dataset")
  b.add_argument("--src", required=True, help="folder of images (class sub-folders = labels)")
  b.add_argument("--dst", required=True, help="dataset directory to create")
  b.add_argument("--resolution", type=int, default=None,
                 help="ADM center-crop every image to RESOLUTION x RESOLUTION")
  b.add_argument("--strict", action="store_true",
                 help="reject the build on any unreadable or odd-sized image (default: skip it)")
  b.add_argument("--name", default=None, help="dataset name (default: from --dst)")
  b.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 = RGB, 1 = grey")
  b.add_argument("--unconditional", action="store_true",
                 help="do not treat sub-folders as classes (e.g. FFHQ's numbered folders)")
  b.add_argument("--allow_upscale", action="store_true",
                 help="upscale images smaller than --resolution instead of skipping them")
  b.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  b.set_defaults(func=_build)
  i = sub.add_parser("info", help="describe a built dataset or a latent dataset")
  i.add_argument("path")
  i.set_defaults(func=_info)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
