"""Timestep respacing with ADM's semantics (`guided_diffusion/respace.py`).

This module owns `space_timesteps` (which original steps a shorter sampling chain keeps) and
the respaced schedule: new betas 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}} from the kept
alpha_bar values (so the kept marginals q(x_{t_k} | x_0) are unchanged), plus the map from a
respaced index k to the ORIGINAL timestep t_k that the network always receives [IDDPM Sec. 4].
DiffiT samples ImageNet with `space_timesteps(1000, "250")` [DiffiT App. I.2].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffit_jax.diffusion.gaussian import (GaussianSchedule, get_named_beta_schedule,
                                           schedule_from_betas)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
  """The original steps to keep, exactly as ADM's `space_timesteps`.

  The original process is cut into len(section_counts) equal portions (the first
  num_timesteps % len portions one step longer) and portion i is strided down to
  section_counts[i] steps, with fractional stride (size - 1) / (count - 1) rounded. For
  example, with 300 steps and section counts [10, 15, 20], the first 100 steps are strided to
  10 steps, the second 100 to 15 and the last 100 to 20. "ddimN" uses the DDIM paper's fixed
  integer stride instead: range(0, num_timesteps, stride) with exactly N elements.

  Args:
    num_timesteps: number of steps of the original process.
    section_counts: "250", "10,15,20", "ddim50", an int, or a list of ints.

  Returns:
    The set of original step indices to keep.
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    text = section_counts.strip()
    if text.startswith("ddim"):
      try:
        desired_count = int(text[len("ddim"):])
      except ValueError:
        raise ValueError(
            f"Bad respacing {section_counts!r}: 'ddim' must be followed by a step count, "
            "e.g. 'ddim50'.") from None
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
          return set(range(0, num_timesteps, stride))
      raise ValueError(
          f"Bad respacing {section_counts!r}: no integer stride gives exactly {desired_count} "
          f"of {num_timesteps} steps. Pick another count or use a plain count such as "
          f"'{desired_count}'.")
    try:
      section_counts = [int(x) for x in text.split(",")]
    except ValueError:
      raise ValueError(
          f"Bad respacing {section_counts!r}: use a step count ('250'), comma-separated counts "
          "per equal section ('10,15,20') or 'ddimN' ('ddim50').") from None
  section_counts = list(section_counts)
  if not section_counts or any(c < 1 for c in section_counts):
    raise ValueError(f"Bad respacing {section_counts!r}: every section count must be >= 1.")
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(
          f"Bad respacing {section_counts!r}: section {i} has {size} of the {num_timesteps} "
          f"steps and cannot keep {section_count}. Use at most {size} steps per section.")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      all_steps.append(start_idx + round(cur_idx))  # Python's round, as ADM (half to even)
      cur_idx += frac_stride
    start_idx += size
  return set(all_steps)


def respace_betas(betas: np.ndarray, use_timesteps: set[int] | Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """ADM's `SpacedDiffusion` betas: keep alpha_bar at the chosen steps, recompute beta.

  Args:
    betas: (T_0,) betas of the original process.
    use_timesteps: original step indices to keep.

  Returns:
    ((T,) float64 respaced betas, (T,) int timestep map to original indices), T = len(kept).
  """
  use_timesteps = set(int(t) for t in use_timesteps)
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  last_alpha_cumprod = 1.0
  new_betas, timestep_map = [], []
  for i, alpha_cumprod in enumerate(alphas_cumprod):
    if i in use_timesteps:
      new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
      last_alpha_cumprod = alpha_cumprod
      timestep_map.append(i)
  return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


def create_schedule(beta_schedule: str = "linear", num_timesteps: int = 1000,
                    respacing: str | int | Sequence[int] = "") -> GaussianSchedule:
  """A (possibly respaced) ADM schedule, like ADM's `create_gaussian_diffusion`.

  Args:
    beta_schedule: "linear" or "cosine".
    num_timesteps: steps T_0 of the original (training) process.
    respacing: `space_timesteps` section counts; "" (or None) keeps all T_0 steps.

  Returns:
    The schedule; its `timestep_map` gives the original index of each kept step.
  """
  betas = get_named_beta_schedule(beta_schedule, num_timesteps)
  if respacing in ("", None):
    return schedule_from_betas(betas)
  new_betas, timestep_map = respace_betas(betas, space_timesteps(num_timesteps, respacing))
  if new_betas.shape[0] < 2:
    raise ValueError(f"Respacing {respacing!r} keeps {new_betas.shape[0]} step; keep at least 2.")
  return schedule_from_betas(new_betas, timestep_map)
