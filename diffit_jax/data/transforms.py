"""Per-image preprocessing shared by the dataset builder and the training pipeline.

Owns the one implementation of ADM's center crop (Dhariwal & Nichol 2021,
`guided_diffusion/image_datasets.py::center_crop_arr`, also used by DiT and DiffiT for
ImageNet): box-downsample by 2 while the short side is at least twice the target, bicubic
resize so the short side equals the target, then crop the center. Also channel conversion
and the uint8 -> [-1, 1] scaling used everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
  """ADM center crop: resizes the short side to `image_size`, crops the center square.

  Args:
    image: a PIL image (any size, any mode PIL can resize).
    image_size: side of the square output.

  Returns:
    uint8 array (image_size, image_size) or (image_size, image_size, C), per the mode.
  """
  # Repeated 2x box downsampling first: a single large bicubic step aliases.
  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Returns a uint8 (H, W, channels) image: grey tiled to RGB, or RGB to luma.

  Args:
    image: uint8 (H, W) or (H, W, C) with C in {1, 3, 4} (alpha is dropped).
    channels: 1 or 3.
  """
  if image.ndim == 2:
    image = image[..., None]  # (H, W, 1)
  if image.shape[-1] == 4:
    image = image[..., :3]
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)  # (H, W, 3)
  if have == 3 and channels == 1:
    # ITU-R 601-2 luma, as PIL's convert("L").
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f"Cannot convert an image with {have} channels to {channels} channels; "
                   "set config.data.channels to 1 or 3.")


def fit_image(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """Returns uint8 (image_size, image_size, channels); ADM-center-crops other sizes."""
  image = np.asarray(image)
  if image.shape[:2] != (image_size, image_size):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]  # PIL wants (H, W) for grey.
    image = center_crop_arr(Image.fromarray(image), image_size)
  return to_channels(image, channels)


def uint8_to_unit_range(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels [0, 255] to float32 [-1, 1]."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
