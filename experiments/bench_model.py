"""The network every experiment measures, and the FLOPs its MFU is computed from.

The latent DiffiT of `configs/imagenet256_latent.py` at a named size ("S/2", "B/2", "XL/2")
or `TINY` (for smoke tests); the random weights both frameworks start from; its forward
FLOPs counted by hand from the architecture (checked in tests/test_benchmark.py against
an independent count and against XLA's cost analysis, which MFU uses); and a large matmul
whose measured speed is the peak MFU is relative to.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffit_jax import models
from diffit_jax.config_lib import load_config

from bench_common import ROOT

CONFIG = os.path.join(ROOT, "configs", "imagenet256_latent.py")
# A variant outside the size table, for smoke tests (built as config.model.variant="custom").
TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)
WEIGHT_STD = 0.02  # random weights for both frameworks (see `random_weights`)


def model_config(variant: str, *, input_size: int = 32, precision: str = "fp32") -> Any:
  """`config.model` of the ImageNet-256 latent config for `variant` ("S/2", ..., "tiny")."""
  config = load_config(CONFIG).model
  config.input_size = input_size
  config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
  if variant == "tiny":
    config.variant = models.CUSTOM_VARIANT
    config.update(TINY)
  else:
    config.variant = variant
  return config


def random_weights(params: Any, seed: int = 0, std: float = WEIGHT_STD) -> Any:
  """Every float weight drawn from N(0, std^2), on the leaf's own sharding.

  The official init zeroes the output layer, so a fresh network back-propagates exact
  zeros; random weights (in both frameworks) make the backward pass do real arithmetic.
  """
  rng = np.random.default_rng(seed)
  def draw(x):
    # Drawn in float32, not float64: 4x faster for XL/2's 561 M weights (seconds per case).
    value = rng.standard_normal(x.shape, dtype=np.float32)
    value *= std
    return jax.device_put(value.astype(x.dtype), x.sharding)
  return jax.tree.map(draw, params)


def analytic_forward_flops(config: Any, batch_size: int = 1) -> float:
  """FLOPs of the matmuls of one latent DiffiT forward (2 per multiply-add).

  Counted from the architecture, not from XLA: patch embedding, time MLP, per block the
  spatial and temporal q/k/v projections (Eqs. 3-5), q k^T and attention x v (Eq. 6), the
  output projection and the MLP, then the final linear layer.
  """
  s = models.latent_sizes(config)
  d, depth, p = s["hidden_size"], s["depth"], s["patch_size"]
  c_in = config.in_channels
  c_out = 2 * c_in if config.learn_sigma else c_in
  n = (config.input_size // p) ** 2  # tokens
  window = config.get("window_size") or int(math.isqrt(n))
  t = window * window  # tokens per attention window
  hidden = int(d * config.mlp_ratio)
  per_image = (
      n * p * p * c_in * d                      # patch embedding
      + 256 * d + d * d                         # timestep MLP (256-wide sinusoid)
      + depth * (n * d * 3 * d                  # spatial q, k, v
                 + d * 3 * d                    # temporal q, k, v (one time token)
                 + 2 * n * t * d                # q k^T and attention x v
                 + n * d * d                    # output projection
                 + 2 * n * d * hidden)          # MLP
      + n * d * p * p * c_out)                  # final layer
  return 2.0 * per_image * batch_size


def train_step_flops(config: Any, batch_size: int) -> tuple[float, str]:
  """3x the forward's FLOPs: XLA's count where the backend gives one, else the analytic count.

  (JAX 0.11 on GPU returns no cost analysis before compiling.)
  """
  try:
    return 3 * models.forward_flops(config, batch_size), "XLA cost analysis"
  except TypeError:
    return 3 * analytic_forward_flops(config, batch_size), "analytic matmul count"


def matmul_runner(size: int, dtype: Any) -> tuple[Callable[[], None], float]:
  """A jitted (size x size) @ (size x size) in `dtype` and its FLOPs: the device's peak."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  return (lambda: jax.block_until_ready(matmul(a, a))), 2.0 * size ** 3
