"""`python -m diffit_jax.main --config=NAME[:arg] --workdir=DIR [--config.a.b=v ...]`.

Flags only; the work happens in `diffit_jax.train`. `--dry_run` builds the network
abstractly (no weights allocated), prints its parameter table, `trainable_params`
and `gflops_per_forward`, then "will it fit": the per-device memory of the train step for
the config's mesh and batch size, from XLA's memory plan of the step compiled for the
devices present or, with `--dry_run_devices=N`, for N virtual CPU devices. Then it exits.
"""

import sys
from collections.abc import Sequence

from diffit_jax import cli, config_lib


def define_flags(flag_values, argv: Sequence[str]) -> None:
  """Defines the command's flags in `flag_values`; `argv` is the command line (the config's
  `--config.a.b=v` overrides are read from it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = flag_values
  config_lib.DEFINE_config_file("config", "A shipped config's name or a config file, with its "
                                ":arg variant if any (e.g. cifar10:runlocal, configs/cifar10.py, "
                                "my_config.py).", flag_values=fv, argv=argv)
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the model summary and the train step's "
                    "per-device memory, and exit.", flag_values=fv)
  flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: estimate memory for a mesh of "
                       "this many virtual CPU devices (0: the devices present, on their own "
                       "backend).", flag_values=fv)
  flags.DEFINE_string("dry_run_tpu", None, "Print the train step's plan per chip on this TPU "
                      "slice (e.g. v5e-8, v5e-1, v4-8, v5p-8, v6e-8, v5e:2x4) from libtpu's "
                      "compiler, on a machine with no TPU; implies --dry_run. Needs libtpu "
                      "(docs/performance.md).", flag_values=fv)
  flags.DEFINE_bool("dry_run_memory", True, "With --dry_run: compile the train step to "
                    "estimate its memory (about a minute for XL/2 on a CPU).", flag_values=fv)


def model_summary(config) -> str:
  """The parameter table, trainable parameter count and per-sample forward GFLOPs."""
  from clu import parameter_overview
  from flax import nnx

  from diffit_jax import models

  model = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flops = models.forward_flops(config.model)
  return "\n".join([
      parameter_overview.get_parameter_overview(params, include_stats=False),
      f"trainable_params: {models.count_params(model)}",
      f"gflops_per_forward: {flops / 1e9:.2f}",
      f"gmacs_per_forward: {flops / 2e9:.2f}  (the paper's 'GFLOPs' count multiply-adds)",
  ])


# How far the estimate can be trusted: the measured figures are in docs/performance.md
# ("Will it fit"), from experiments/results/accelerator_nvidia_h200.* and fit_xl2.*.
MEMORY_NOTE = (
    "note: XLA's plan for one device: weights, EMA and optimizer state as config.mesh shards "
    "them, this device's share of the batch, and the step's temporaries; not the framework's "
    "own reserve, the data pipeline, sampling or FID. On a GPU or TPU it is that compiler's "
    "own plan (an H200 ran its steps within a few percent of their plans). XLA:CPU plans "
    "more temporaries than a GPU's compiler for the same step: read a CPU estimate as an "
    "upper bound (measurements: docs/performance.md, \"Will it fit\"); for a TPU, "
    "--dry_run_tpu=SLICE gives the TPU compiler's own plan from any machine.")


def train_step_memory_summary(config, num_devices: int) -> str:
  """Per-device memory of the train step over the config's mesh (see MEMORY_NOTE)."""
  import jax

  from diffit_jax import plan, sharding

  devices = jax.devices()
  if num_devices > len(devices):
    raise RuntimeError(f"--dry_run_devices={num_devices}, but JAX already runs on "
                         f"{len(devices)} devices; this is a bug.")
  devices = devices[:num_devices] if num_devices else devices
  mesh = sharding.create_mesh(config.mesh, devices)
  p = plan.compile_plan(plan.train_step(config, mesh))
  remat = f", remat={config.model.remat}" if config.model.name == "latent" else ""
  kind = "virtual CPU" if num_devices else devices[0].platform.upper()
  return "\n".join([
      plan.memory_line(p, "train_step_memory_per_device"),
      f"  for global batch {config.batch_size} over mesh {dict(mesh.shape)} of {mesh.size} "
      f"{kind} devices ({devices[0].device_kind}){remat}",
      MEMORY_NOTE,
  ])


def dry_run(config, workdir: str | None, overrides: Sequence[str], *, num_devices: int = 0,
            memory: bool = True, tpu_slice: str | None = None) -> None:
  """`--dry_run`: prints the model summary and, with `memory`, the train step's per-device
  memory over `num_devices` virtual CPU devices (0: the devices present), or its plan per
  chip on the TPU slice `tpu_slice` (compiled by libtpu, no TPU needed); trains nothing."""
  from diffit_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  if tpu_slice:  # a misspelt slice or a missing libtpu is said before any work
    from diffit_jax import tpu  # pylint: disable=g-import-not-at-top
    tpu.parse_slice(tpu_slice)
    tpu.library_path()
  # The run training would resolve, but no data read unless the config leaves fields to
  # it, and of config.init_from only its architecture.
  config = run_lib.resolve_run(config, workdir, overrides, dry_run=True).config
  print(model_summary(config), flush=True)
  if tpu_slice:
    from diffit_jax import plan  # pylint: disable=g-import-not-at-top
    for line in plan.tpu_train_report(config, tpu_slice):  # a line as each compile ends
      print(line, flush=True)
  elif memory:
    print(train_step_memory_summary(config, num_devices))


def run(args, overrides: Sequence[str]) -> None:
  """Trains the run the parsed flags `args` describe (or, with --dry_run, describes it);
  `overrides` are the config fields the command line sets."""
  if args.dry_run or args.dry_run_tpu:
    import jax  # pylint: disable=g-import-not-at-top
    if args.dry_run_tpu:  # the TPU is only compiled for: JAX itself runs on the CPU
      jax.config.update("jax_platforms", "cpu")
    elif args.dry_run_devices:
      # Nothing has used JAX yet: its CPU backend can still be given N devices.
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", args.dry_run_devices)
    dry_run(args.config, args.workdir, overrides, num_devices=args.dry_run_devices,
            memory=args.dry_run_memory, tpu_slice=args.dry_run_tpu)
    return
  if not args.workdir:
    raise cli.UsageError("--workdir is required for training (or pass --dry_run).")
  from diffit_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(args.config, args.workdir, overrides=overrides)  # checks all first


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides = config_lib.overridden_paths(argv)  # the fields this command line sets
  return cli.run_command(argv, prog="python -m diffit_jax.main", doc=__doc__,
                         define_flags=lambda fv: define_flags(fv, argv),
                         run=lambda args: run(args, overrides))


if __name__ == "__main__":
  sys.exit(main())
