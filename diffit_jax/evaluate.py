"""ADM-compatible sample evaluation from the command line.

    python -m diffit_jax.evaluate --ref=VIRTUAL_imagenet256_labeled.npz \\
        --samples=samples_50000x256x256x3.npz --inception=checkpoints/inception_fid \\
        --out=results/metrics.json

prints the Inception Score, FID, sFID, precision and recall as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) defines them, and writes them as
JSON to `--out`. `--ref` is an ADM reference batch (`arr_0` images and/or the `mu`,
`sigma`, `mu_s`, `sigma_s` statistics it carries), a statistics file this tool cached,
or a folder of images; `--samples` is an `.npz` with uint8 NHWC images in `arr_0` (the
sampler's output) or a folder. The Inception checkpoint comes from
`python -m diffit_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth`.

Computed reference statistics are cached next to `--out` (`--ref_cache` to choose the
file, `--no_ref_cache` to disable), keyed on the reference file and the Inception weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffit_jax.evaluation.evaluator import Evaluator
from diffit_jax.evaluation.images import open_images


def default_cache_path(ref: str, out: str | None) -> str:
  """`<folder of --out>/<reference name>.inception_stats.npz`."""
  folder = os.path.dirname(os.path.abspath(out)) if out else os.getcwd()
  name = os.path.basename(os.path.normpath(ref))
  if name.endswith(".npz"):
    name = name[:-len(".npz")]
  return os.path.join(folder, f"{name}.inception_stats.npz")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m diffit_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ref", required=True,
                      help="reference batch .npz, statistics .npz or image folder")
  parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0) or image folder")
  parser.add_argument("--inception", required=True,
                      help="Inception checkpoint from `python -m diffit_jax.convert inception`")
  parser.add_argument("--out", default=None, help="write the metrics as JSON to this file")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="global Inception batch size (multiple of the device count)")
  parser.add_argument("--ref_cache", default=None,
                      help="reference statistics cache file (default: next to --out)")
  parser.add_argument("--no_ref_cache", action="store_true", help="never read or write the cache")
  parser.add_argument("--no_precision_recall", action="store_true",
                      help="skip precision/recall (pairwise distances of all features)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser


def evaluate(args: argparse.Namespace) -> dict:
  """Runs the evaluation described by parsed CLI arguments; returns the JSON-able result."""
  for name in ("ref", "samples"):
    if not os.path.exists(getattr(args, name)):
      raise FileNotFoundError(f"--{name}={getattr(args, name)} does not exist.")
  if not os.path.isdir(args.inception):
    raise FileNotFoundError(
        f"--inception={args.inception} is not a checkpoint folder; convert pytorch-fid's "
        "weights with `python -m diffit_jax.convert inception --src=... --dst=...`.")
  samples = open_images(args.samples)  # Fails early on a bad samples file.
  cache = None if args.no_ref_cache else (args.ref_cache or default_cache_path(args.ref, args.out))
  evaluator = Evaluator(args.inception, args.ref, cache_path=cache, batch_size=args.batch_size,
                        progress=not args.no_progress)
  scores = evaluator(samples.batches(args.batch_size), total=len(samples),
                     precision_recall=not args.no_precision_recall)
  return {**scores, "ref": os.path.abspath(args.ref), "samples": os.path.abspath(args.samples),
          "inception": os.path.abspath(args.inception)}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    result = evaluate(args)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  def show(value):
    return "n/a" if value is None else value
  print("Inception Score:", result["inception_score"])
  print("FID:", result["fid"])
  print("sFID:", result["sfid"])
  print("Precision:", show(result["precision"]))
  print("Recall:", show(result["recall"]))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
