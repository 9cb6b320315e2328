"""`python -m diffit_jax.main --config=NAME[:arg] --workdir=DIR [--config.a.b=v ...]`.

Flags only; the work happens in `diffit_jax.train`. `--dry_run` builds the network
abstractly (no weights allocated), prints its parameter table, `trainable_params`
and `gflops_per_forward`, then "will it fit": the per-device memory of the train step for
the config's mesh and batch size, from XLA's memory plan of the step compiled for the
devices present or, with `--dry_run_devices=N`, for N virtual CPU devices. Then it exits.
"""

import sys

from absl import app, flags

from diffit_jax import cli, config_lib

FLAGS = flags.FLAGS
config_lib.DEFINE_config_file("config", "A shipped config's name or a config file, with its "
                              ":arg variant if any (e.g. cifar10:runlocal, configs/cifar10.py, "
                              "my_config.py).")
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")
flags.DEFINE_bool("dry_run", False, "Print the model summary and the train step's "
                  "per-device memory, and exit.")
flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: estimate memory for a mesh of this "
                     "many virtual CPU devices (0: the devices present, on their own backend).")
flags.DEFINE_bool("dry_run_memory", True, "With --dry_run: compile the train step to estimate "
                  "its memory (about a minute for XL/2 on a CPU).")


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
    "upper bound (measurements: docs/performance.md, \"Will it fit\").")


def train_step_memory_summary(config, num_devices: int) -> str:
  """Per-device memory of the train step over the config's mesh (see MEMORY_NOTE)."""
  import jax

  from diffit_jax import sharding, train

  devices = jax.devices()
  if num_devices > len(devices):
    raise RuntimeError(f"--dry_run_devices={num_devices}, but JAX already runs on "
                         f"{len(devices)} devices; this is a bug.")
  devices = devices[:num_devices] if num_devices else devices
  mesh = sharding.create_mesh(config.mesh, devices)
  m = train.train_step_memory(config, mesh)
  gib = lambda x: f"{x / 2 ** 30:.3f} GiB"
  remat = f", remat={config.model.remat}" if config.model.name == "latent" else ""
  kind = "virtual CPU" if FLAGS.dry_run_devices else devices[0].platform.upper()
  return "\n".join([
      f"train_step_memory_per_device: {gib(m['total'])} = state and batch "
      f"{gib(m['arguments'])} + XLA temporaries {gib(m['temporaries'])} + outputs not "
      f"donated {gib(m['outputs'] - m['aliased'])}",
      f"  for global batch {config.batch_size} over mesh {dict(mesh.shape)} of {mesh.size} "
      f"{kind} devices ({devices[0].device_kind}){remat}",
      MEMORY_NOTE,
  ])


def main(argv):
  del argv
  config = FLAGS.config
  overrides = config_lib.overridden_paths(sys.argv)  # the fields this command line sets
  if FLAGS.dry_run and FLAGS.dry_run_devices:
    import jax  # nothing has used JAX yet: its CPU backend can still be given N devices
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.dry_run_devices)
  from diffit_jax import checkpoint, files, train
  # What a user can act on ends with one `error:` line; anything else keeps its traceback:
  # the config (all checked before anything is written), missing files, a run that
  # diverged (the message names the newest good checkpoint), a workdir whose checkpoints
  # are all damaged, a workdir another run is using, a full disk, a damaged metadata file.
  user_errors = (config_lib.ConfigError, FileNotFoundError, train.NonFiniteLossError,
                 checkpoint.CorruptCheckpointError, files.FolderInUseError,
                 files.OutOfSpaceError, files.DamagedFileError)
  try:
    if FLAGS.dry_run:
      from diffit_jax import run  # pylint: disable=g-import-not-at-top
      # The run training would resolve, but no data read unless the config leaves fields
      # to it, and of config.init_from only its architecture.
      config = run.resolve_run(config, FLAGS.workdir, overrides, dry_run=True).config
      print(model_summary(config))
      if FLAGS.dry_run_memory:
        print(train_step_memory_summary(config, FLAGS.dry_run_devices))
      return
    if not FLAGS.workdir:
      sys.exit(cli.report_user_error("--workdir is required for training (or pass --dry_run)."))
    train.train_and_evaluate(config, FLAGS.workdir, overrides=overrides)  # checks all first
  except user_errors as e:
    sys.exit(cli.report_user_error(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_absl_flags)
