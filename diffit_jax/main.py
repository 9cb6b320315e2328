"""`python -m diffit_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Flags only; the work happens in `diffit_jax.train`. `--dry_run` builds the network
abstractly (no weights allocated), prints its parameter table, `trainable_params`
and `gflops_per_forward`, and exits.
"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")
flags.DEFINE_bool("dry_run", False, "Print the model summary and exit.")
flags.mark_flags_as_required(["config"])


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


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.dry_run:
    print(model_summary(config))
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required for training (or pass --dry_run).")
  from diffit_jax import train
  train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
