"""Weight converters: PyTorch checkpoints in, Flax checkpoints out (and back).

Each converter lives in its own module of this package and exposes
`define_flags(flag_values)` (absl flags: `--src`, `--out`, ...) and `run(flag_values)`;
`python -m diffit_jax.convert NAME --flags...` dispatches to it (see `__main__.py` and
`diffit_jax.cli.run_subcommand`).
"""
