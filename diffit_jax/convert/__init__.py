"""Weight converters: PyTorch checkpoints in, Flax checkpoints out (and back).

Each converter lives in its own module of this package and exposes
`add_arguments(parser)` and `run(args)`; `python -m diffit_jax.convert NAME ...`
dispatches to it (see `__main__.py`).
"""
