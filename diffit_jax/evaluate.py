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
file, `--nocache` to disable), keyed on the reference file and the Inception weights.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from diffit_jax import cli
from diffit_jax.evaluation.evaluator import Evaluator
from diffit_jax.evaluation.images import open_images


def default_cache_path(ref: str, out: str | None) -> str:
  """`<folder of --out>/<reference name>.inception_stats.npz`."""
  folder = os.path.dirname(os.path.abspath(out)) if out else os.getcwd()
  name = os.path.basename(os.path.normpath(ref))
  if name.endswith(".npz"):
    name = name[:-len(".npz")]
  return os.path.join(folder, f"{name}.inception_stats.npz")


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the command's flags in `flag_values`."""
  fv = flag_values
  flags.DEFINE_string("ref", None, "Reference batch .npz, statistics .npz or image folder.",
                      required=True, flag_values=fv)
  flags.DEFINE_string("samples", None, "Sample batch .npz (arr_0) or image folder.",
                      required=True, flag_values=fv)
  flags.DEFINE_string("inception", None, "Inception checkpoint from `python -m "
                      "diffit_jax.convert inception`.", required=True, flag_values=fv)
  flags.DEFINE_string("out", None, "Write the metrics as JSON to this file.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Global Inception batch size (multiple of the device "
                       "count).", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("ref_cache", None, "Reference statistics cache file (default: next to "
                      "--out).", flag_values=fv)
  flags.DEFINE_bool("cache", True, "Read and write the reference statistics cache "
                    "(--nocache: never).", flag_values=fv)
  flags.DEFINE_bool("precision_recall", True, "Compute precision/recall (pairwise distances of "
                    "all features; --noprecision_recall skips them).", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Print progress lines.", flag_values=fv)


def evaluate(args: flags.FlagValues) -> dict:
  """Runs the evaluation described by the parsed flags; returns the JSON-able result."""
  for name in ("ref", "samples"):
    if not os.path.exists(getattr(args, name)):
      raise FileNotFoundError(f"--{name}={getattr(args, name)} does not exist.")
  if not os.path.isdir(args.inception):
    raise FileNotFoundError(
        f"--inception={args.inception} is not a checkpoint folder; convert pytorch-fid's "
        "weights with `python -m diffit_jax.convert inception --src=... --out=...`.")
  samples = open_images(args.samples)  # Fails early on a bad samples file.
  cache = None if not args.cache else (args.ref_cache or default_cache_path(args.ref, args.out))
  evaluator = Evaluator(args.inception, args.ref, cache_path=cache, batch_size=args.batch_size,
                        progress=args.progress)
  scores = evaluator(samples.batches(args.batch_size), total=len(samples),
                     precision_recall=args.precision_recall)
  return {**scores, "ref": os.path.abspath(args.ref), "samples": os.path.abspath(args.samples),
          "inception": os.path.abspath(args.inception)}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  return cli.run_command(argv, prog="python -m diffit_jax.evaluate", doc=__doc__,
                         define_flags=define_flags, run=run)


def run(args: flags.FlagValues) -> int:
  """Evaluates, prints the scores and writes `--out`."""
  result = evaluate(args)
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
