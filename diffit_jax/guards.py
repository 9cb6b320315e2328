"""What stops the training loop early: a NaN/Inf (the NaN guard) and SIGTERM.

  * `check_losses` and `make_state_check`: the loss and gradient norm of every step are
    checked each log interval and before every checkpoint, and the whole state before each
    save, so that a checkpoint never holds poisoned weights; `NonFiniteLossError` names
    the steps and the newest good checkpoint, which a rerun resumes from.
  * `Preemption`: SIGTERM (a preempted VM) makes the loop checkpoint and exit cleanly.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffit_jax import sharding as sharding_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or the state became NaN or Inf; the message names the steps and the last good
  checkpoint."""


def non_finite_advice(last_good: int | None, ckpt_dir: str) -> str:
  """Where a rerun starts after NonFiniteLossError, and what to change."""
  where = (f"The newest good checkpoint is step {last_good} in {ckpt_dir}; a rerun resumes "
           "from it" if last_good is not None else
           "No good checkpoint was saved yet; a rerun starts from scratch")
  return (f"{where}. Lower the learning rate, enable gradient clipping "
          "(config.optimizer.grad_clip_norm) or warm-up (config.optimizer.warmup_steps).")


def check_losses(pending: list[tuple[int, dict]], last_good: int | None, ckpt_dir: str) -> None:
  """Raises NonFiniteLossError if a loss or gradient norm in `pending` is NaN/Inf.

  A finite loss with a non-finite gradient would still poison the weights, so both are
  checked; this runs on the host every log interval and before every checkpoint.
  """
  if not pending:
    return
  steps = [s for s, _ in pending]
  values = np.array(jax.device_get([(m["loss"], m["grad_norm"]) for _, m in pending]),
                    np.float64)  # (num_steps, 2)
  bad = ~np.isfinite(values).all(axis=1)
  if not bad.any():
    return
  first = steps[int(np.argmax(bad))]
  raise NonFiniteLossError(
      f"The training loss or gradient became NaN/Inf between steps {steps[0]} and {steps[-1]} "
      f"(first at step {first}); stopping without saving. "
      + non_finite_advice(last_good, ckpt_dir))


def make_state_check(shardings: Any, mesh: Mesh) -> Callable[[Any], bool]:
  """`is_finite(state)`: whether every weight, EMA weight and optimizer moment is finite.

  `shardings` are those of the train state (`train.Setup.shardings`).

  A loss can still be finite at the step whose update overflowed the weights, so the
  state itself is checked before each save. One jitted reduction on the devices (XLA
  fuses each leaf's isfinite-all into one pass over the state, ~4 reads per parameter)
  and one bool to the host: cheap next to the checkpoint it guards.
  """
  def all_finite(state) -> jax.Array:
    trees = (state.params, state.ema_params, state.opt_state)
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))

  fn = jax.jit(all_finite, in_shardings=(shardings,),
               out_shardings=sharding_lib.replicated(mesh))
  return lambda state: bool(fn(state))


class Preemption:
  """Notices SIGTERM (a preempted VM) so that the loop checkpoints and exits cleanly.

  One process: a Python signal handler sets a flag. Several processes: JAX's preemption
  sync manager (started by `jax.distributed.initialize`) propagates the notice and picks
  a step at which every process stops together (`reached_preemption_sync_point`).
  """

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting.")
    self.received = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
