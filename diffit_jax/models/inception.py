"""Inception-v3 as the FID network: the 2015-12-05 TensorFlow graph in Flax NNX (NHWC).

This is the feature network of every FID number in the diffusion literature: the
`classify_image_graph_def.pb` graph of `inception-2015-12-05.tgz` that the ADM
evaluator (openai/guided-diffusion `evaluations/evaluator.py`) imports. Its weights
come from pytorch-fid's port (`pt_inception-2015-12-05-*.pth`, converted by
`diffit_jax.convert.inception`), so module and parameter names follow pytorch-fid /
torchvision (`Mixed_5b.branch1x1.conv`, ...). The graph differs from torchvision's
Inception-v3 in exactly the places pytorch-fid patches (`FIDInceptionA/C/E_1/E_2`):

  * the 3x3 average pools inside the A, C and E blocks ignore the padding
    (TensorFlow's `avg_pool`; PyTorch's `count_include_pad=False`);
  * the pooling branch of the last block (`Mixed_7c`, pytorch-fid's `FIDInceptionE_2`)
    is a 3x3 *max* pool;
  * 1008 output classes.

The input pipeline is the graph's own, as the ADM evaluator feeds it (images in
[0, 255] go in at `ExpandDims:0`): `ResizeBilinear` to 299x299 with TensorFlow 1.x's
legacy sampling (`align_corners=False`, no half-pixel offset; pytorch-fid's
`F.interpolate(..., align_corners=False)` samples at half-pixel centres instead and
so does not match the graph), then `(x - 128) / 128`.

Outputs (`InceptionOutputs`), as the ADM evaluator reads them:
  * `pool`: `pool_3:0`, the 2048-d average-pooled features (FID, precision/recall).
  * `spatial`: `mixed_6/conv:0[..., :7]` flattened in (H, W, C) order, 17*17*7 = 2023-d
    (sFID). In the graph `mixed_6` is the fourth 17x17 block (pytorch-fid's `Mixed_6d`;
    `mixed`, `mixed_1`, `mixed_2` are Mixed_5b-d and `mixed_3` is Mixed_6a) and
    `mixed_6/conv` is its 1x1 branch after BN and ReLU (`Mixed_6d.branch1x1`, 192
    channels), not the block's 768-channel output.
  * `logits`: `pool @ W` with the softmax layer's weights and *no bias*: ADM (and
    improved-GAN's Inception Score before it) rebuilds the softmax from the
    `softmax/logits/MatMul` weights alone. The graph's bias is therefore not kept.

Batch norm is eval-mode (running statistics, epsilon 1e-3 as in the graph's
`BatchNormWithGlobalNormalization`). Convolutions and the final matmul run at
`Precision.HIGHEST` so accelerators do not silently drop to TF32/bf16 passes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels.
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPSILON = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST


class InceptionOutputs(NamedTuple):
  """Features of one batch (ADM tensor names in brackets)."""
  pool: jax.Array  # (B, 2048) [pool_3:0]
  spatial: jax.Array  # (B, 2023) [mixed_6/conv:0, first 7 channels, HWC order]
  logits: jax.Array  # (B, 1008) [pool_3 @ softmax/logits/MatMul weights]


def _tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Rows of TF 1.x legacy bilinear interpolation weights, shape (out_size, in_size).

  TensorFlow's `ResizeBilinear` (align_corners=False, half_pixel_centers=False)
  samples output index `o` at source coordinate `o * (in / out)` computed in float32,
  between `floor` and `min(floor + 1, in - 1)` (tensorflow/core/kernels/
  resize_bilinear_op.cc, `LegacyScaler`; reproduced in torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x`).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale  # (out,)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Resizes NHWC images to (size, size) exactly as the 2015 graph's `ResizeBilinear`.

  Written as two small matmuls with precomputed interpolation weights (separable
  bilinear interpolation), which XLA runs far faster than gathers.

  Args:
    images: (B, H, W, C) float array.
    size: output height and width.

  Returns:
    (B, size, size, C) float32 array.
  """
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images.astype(jnp.float32)  # The graph's resize is then the identity.
  wy = jnp.asarray(_tf1_resize_matrix(h, size))  # (size, H)
  wx = jnp.asarray(_tf1_resize_matrix(w, size))  # (size, W)
  x = images.astype(jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", wy, x, precision=_PRECISION)  # (B, size, W, C)
  return jnp.einsum("pw,bowc->bopc", wx, x, precision=_PRECISION)  # (B, size, size, C)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> eval-mode BatchNorm (eps 1e-3) -> ReLU; torchvision's `BasicConv2d`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int | tuple[int, int],
               *, stride: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(in_features, out_features, (kh, kw), strides=stride,
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, use_running_average=True, epsilon=BN_EPSILON,
                            rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TensorFlow's SAME average pool divides by the number of unpadded inputs.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"  # Padding never wins a max.
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
  """35x35 block (Mixed_5b-d); pytorch-fid's `FIDInceptionA`."""

  def __init__(self, in_features: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_features, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # (B, 35, 35, 224 + pool_features)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  def __init__(self, in_features: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_features, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = _max_pool_3x3(x, stride=2)
    return jnp.concatenate([b3, bd, bp], axis=-1)  # (B, 17, 17, 768)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b-e); `FIDInceptionC`."""

  def __init__(self, in_features: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_features, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_features, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)  # (B, 17, 17, 768)


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  def __init__(self, in_features: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
    bp = _max_pool_3x3(x, stride=2)
    return jnp.concatenate([b3, b7, bp], axis=-1)  # (B, 8, 8, 1280)


class InceptionE(nnx.Module):
  """8x8 block with expanded filter banks (Mixed_7b, Mixed_7c); `FIDInceptionE_1/_2`.

  `pool="avg"` is `FIDInceptionE_1` (Mixed_7b); `pool="max"` is `FIDInceptionE_2`
  (Mixed_7c), whose pooling branch the 2015 graph builds with a max pool.
  """

  def __init__(self, in_features: int, *, pool: str, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_features, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_features, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3(x, stride=1)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # (B, 8, 8, 2048)


class InceptionV3(nnx.Module):
  """The FID Inception-v3 (2015-12-05 graph): uint8 images in, ADM's features out."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
    # The graph's softmax layer; its bias is unused by ADM's logits (module docstring).
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, use_bias=False, precision=_PRECISION, rngs=rngs)

  def __call__(self, images: jax.Array) -> InceptionOutputs:
    """Computes ADM's Inception features.

    Args:
      images: (B, H, W, 3) images with values in [0, 255], uint8 or float (as the ADM
        evaluator feeds its batches, cast to float32). Any H, W: they are resized to
        299x299 by the graph's bilinear resize.

    Returns:
      `InceptionOutputs(pool (B, 2048), spatial (B, 2023), logits (B, 1008))`, float32.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
    x = resize_bilinear_tf1(images)  # (B, 299, 299, 3)
    x = (x - 128.0) / 128.0  # The graph's Sub/Mul: [0, 255] -> [-1, 1).
    x = self.Conv2d_1a_3x3(x)  # (B, 149, 149, 32)
    x = self.Conv2d_2a_3x3(x)  # (B, 147, 147, 32)
    x = self.Conv2d_2b_3x3(x)  # (B, 147, 147, 64)
    x = _max_pool_3x3(x, stride=2)  # (B, 73, 73, 64)
    x = self.Conv2d_3b_1x1(x)  # (B, 73, 73, 80)
    x = self.Conv2d_4a_3x3(x)  # (B, 71, 71, 192)
    x = _max_pool_3x3(x, stride=2)  # (B, 35, 35, 192)
    x = self.Mixed_5b(x)  # (B, 35, 35, 256)
    x = self.Mixed_5c(x)  # (B, 35, 35, 288)
    x = self.Mixed_5d(x)  # (B, 35, 35, 288)
    x = self.Mixed_6a(x)  # (B, 17, 17, 768)
    x = self.Mixed_6b(x)  # (B, 17, 17, 768)
    x = self.Mixed_6c(x)  # (B, 17, 17, 768)
    # mixed_6/conv:0 is the 1x1 branch of Mixed_6d; XLA shares it with the block's own use.
    spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]  # (B, 17, 17, 7)
    spatial = spatial.reshape(spatial.shape[0], -1)  # (B, 2023), (H, W, C) order as ADM.
    x = self.Mixed_6d(x)  # (B, 17, 17, 768)
    x = self.Mixed_6e(x)  # (B, 17, 17, 768)
    x = self.Mixed_7a(x)  # (B, 8, 8, 1280)
    x = self.Mixed_7b(x)  # (B, 8, 8, 2048)
    x = self.Mixed_7c(x)  # (B, 8, 8, 2048)
    pool = jnp.mean(x, axis=(1, 2))  # (B, 2048): pool_3, the 8x8 average pool.
    logits = self.fc(pool)  # (B, 1008)
    return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)
