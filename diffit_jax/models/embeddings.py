"""Embeddings shared by the DiffiT networks: timestep, label and 2-D position.

The timestep embedding is the `[cos, sin]` sinusoid of DiT/ADM followed by a Swish
MLP (paper §3.2: "feeding positional time embeddings to a small MLP with swish"),
the label table carries one extra row for the classifier-free-guidance null class,
and the fixed 2-D sin-cos position embedding follows MAE (column first), exactly as
the official latent release computes it (docs/official_checkpoint.md, "Forward pass",
steps 1-3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, cos first.

  Args:
    t: (B,) timesteps (the original DDPM index, or EDM's c_noise).
    dim: embedding width (even).
    max_period: controls the lowest frequency.

  Returns:
    (B, dim) float32 `[cos(t * f), sin(t * f)]` with f = max_period^(-k / (dim/2)).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]  # (B, half)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, dim)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
  """Fixed MAE 2-D sin-cos position embedding for a square grid.

  The token at row r, column c (index r * grid_size + c) gets
  `[sin(c w), cos(c w), sin(r w), cos(r w)]` with w_j = 10000^(-j / (dim/4)).

  Args:
    dim: embedding width, divisible by 4.
    grid_size: tokens per side.

  Returns:
    (grid_size**2, dim) float32 NumPy array (a constant, not a parameter).
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  def embed(pos):
    args = pos.reshape(-1)[:, None] * omega[None]  # (N, dim/4)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)  # (N, dim/2)
  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)  # (N, dim)


class TimestepEmbedder(nnx.Module):
  """Time token: sinusoid -> Linear -> SiLU -> Linear (DiT's `TimestepEmbedder`)."""

  def __init__(self, hidden_size: int, *, frequency_size: int = 256, max_period: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.frequency_size = frequency_size
    self.max_period = max_period
    # Official init: the MLP weights are N(0, 0.02), biases zero.
    init = dict(kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.zeros,
                dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(frequency_size, hidden_size, **init)
    self.fc2 = nnx.Linear(hidden_size, hidden_size, **init)

  def __call__(self, t: jax.Array) -> jax.Array:
    freq = timestep_embedding(t, self.frequency_size, self.max_period)  # (B, F)
    return self.fc2(nnx.silu(self.fc1(freq)))  # (B, D)


class LabelEmbedder(nnx.Module):
  """Class-label table with `num_classes + 1` rows; row `num_classes` is the null class.

  Label dropout for classifier-free guidance happens in the training loss (which
  replaces labels by `num_classes`), not here: the network only maps labels to vectors.
  """

  def __init__(self, num_classes: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.embedding_table = nnx.Embed(num_classes + 1, hidden_size, dtype=dtype,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, y: jax.Array) -> jax.Array:
    return self.embedding_table(y)  # (B, D)
