"""Small helpers shared by the CLIs: image conversion and PNG grids."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffit_jax import files


def to_uint8(x: jax.Array, *, rounding: bool = False) -> jax.Array:
  """[-1, 1] images -> uint8.

  `rounding=False` is the official DiffiT release's `clamp((x + 1) * 127.5, 0, 255)`
  cast (truncation); `rounding=True` is EDM's `x * 127.5 + 128` (round to nearest).
  """
  x = (x + 1.0) * 127.5 + (0.5 if rounding else 0.0)
  return jnp.clip(x, 0, 255).astype(jnp.uint8)


def image_grid(images: np.ndarray, num_columns: int | None = None) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image with 2-pixel gaps."""
  n, h, w, c = images.shape
  cols = num_columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  pad = 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes an (H, W, 1|3) uint8 image atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image)
  if image.shape[-1] == 1:
    image = image[..., 0]
  tmp = path + ".tmp.png"
  with files.writing(path, image.nbytes, remove_on_failure=(tmp,)):
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
