"""Image-space DiffiT (paper §3.2, Fig. 4, App. H.1 and I.1): a U-shaped window-TMSA network.

    tokenizer Conv3x3 -> [DiffiTResBlock x L_s -> Downsample] per stage -> bottleneck
    -> [Upsample -> concat skip -> DiffiTResBlock x L_s] per stage -> GN -> Conv3x3 head

A DiffiTResBlock (Eqs. 9-10) is x + DiffiTBlock(Conv3x3(Swish(GN(x))), x_t), the
DiffiTBlock using TMSA in non-overlapping windows. The time token (width 512, §5.1
Table 3) is a sinusoidal embedding of the noise level through a Swish MLP; an
optional label embedding is added to it for class-conditional custom data.

No official code exists for this model; where the paper is silent the choices are
the constructor's defaults, each explained in docs/paper_notes.md ("Our choices where
the paper is silent").
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffit_jax.models.embeddings import LabelEmbedder, TimestepEmbedder
from diffit_jax.models.tmsa import DiffiTBlock

GN_EPS = 1e-6


def _conv(cin, cout, kernel=3, *, stride=1, zero=False, dtype, rngs):
  kwargs = dict(kernel_init=nnx.initializers.zeros) if zero else {}
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding="SAME",
                  dtype=dtype, rngs=rngs, **kwargs)


class DiffiTResBlock(nnx.Module):
  """x_hat = Conv3x3(Swish(GN(x))); out = DiffiTBlock(x_hat, x_t) + skip(x)  (Eqs. 9-10).

  `skip` is a 1x1 convolution when the channel count changes (the paper gives none;
  a residual needs matching widths), otherwise the identity.
  """

  def __init__(self, in_channels: int, out_channels: int, *, time_dim: int, num_heads: int,
               window_size: int, num_groups: int, mlp_ratio: float, dropout_rate: float,
               attention: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(in_channels, num_groups=num_groups, epsilon=GN_EPS, dtype=dtype,
                              rngs=rngs)
    self.conv = _conv(in_channels, out_channels, dtype=dtype, rngs=rngs)
    self.block = DiffiTBlock(out_channels, num_heads, time_dim=time_dim, window_size=window_size,
                             mlp_ratio=mlp_ratio, dropout_rate=dropout_rate, attention=attention,
                             dtype=dtype, rngs=rngs)
    self.skip = (_conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                 if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, c: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    h = self.conv(nnx.silu(self.norm(x)))  # (B, H, W, Cout)
    h = self.block(h, c, rng)  # (B, H, W, Cout)
    return h + (x if self.skip is None else self.skip(x))


class ImageDiffiT(nnx.Module):
  """Image-space DiffiT: `(x, c_noise, y) -> F(x)` (the raw network EDM preconditions).

  Args:
    image_size: input side (32 for CIFAR-10, 64 for FFHQ-64).
    in_channels / out_channels: image channels.
    channels: width of each stage, finest first (CIFAR-10: 128, 256, 256).
    num_blocks: DiffiTResBlocks per stage (CIFAR-10: 2, 2, 2; FFHQ-64: 1, 2, 2, 2).
    window_size: TMSA window (CIFAR-10 4, FFHQ-64 8); clipped to the grid at coarse stages.
    time_dim: width of the time token (512, paper Table 3).
    head_dim: channels per attention head (heads = width / head_dim).
    num_groups: GroupNorm groups.
    mlp_ratio: transformer MLP width ratio.
    dropout_rate: dropout on the transformer MLP's hidden layer during training.
    num_classes: 0 for unconditional (the paper); > 0 adds a label table (+ null class).
    attention: how TMSA computes attention (`tmsa.ATTENTION_IMPLEMENTATIONS`).
    dtype: computation dtype (parameters stay float32).
  """

  def __init__(self, *, image_size: int = 32, in_channels: int = 3, out_channels: int = 3,
               channels: Sequence[int] = (128, 256, 256), num_blocks: Sequence[int] = (2, 2, 2),
               window_size: int = 4, time_dim: int = 512, frequency_size: int = 128,
               head_dim: int = 64, num_groups: int = 32, mlp_ratio: float = 4.0,
               dropout_rate: float = 0.0, num_classes: int = 0, attention: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    if len(channels) != len(num_blocks):
      raise ValueError(f"channels {tuple(channels)} and num_blocks {tuple(num_blocks)} must "
                       "have one entry per stage.")
    if image_size % 2 ** (len(channels) - 1):
      raise ValueError(f"image_size {image_size} cannot be halved {len(channels) - 1} times.")
    self.image_size = image_size
    self.num_classes = num_classes
    self.num_stages = len(channels)

    self.t_embedder = TimestepEmbedder(time_dim, frequency_size=frequency_size, dtype=dtype,
                                       rngs=rngs)
    self.y_embedder = (LabelEmbedder(num_classes, time_dim, dtype=dtype, rngs=rngs)
                       if num_classes > 0 else None)

    def res_block(cin, cout, stage):
      resolution = image_size // 2 ** stage
      return DiffiTResBlock(cin, cout, time_dim=time_dim, num_heads=max(cout // head_dim, 1),
                            window_size=min(window_size, resolution), num_groups=num_groups,
                            mlp_ratio=mlp_ratio, dropout_rate=dropout_rate, attention=attention,
                            dtype=dtype, rngs=rngs)

    self.tokenizer = _conv(in_channels, channels[0], dtype=dtype, rngs=rngs)
    # Encoder: stage s runs at image_size / 2^s; downsamplers keep the width.
    encoder, downsamplers = [], []
    cin = channels[0]
    for s, (ch, n) in enumerate(zip(channels, num_blocks)):
      blocks = []
      for _ in range(n):
        blocks.append(res_block(cin, ch, s))
        cin = ch
      encoder.append(nnx.List(blocks))
      if s < self.num_stages - 1:
        downsamplers.append(_conv(ch, ch, stride=2, dtype=dtype, rngs=rngs))
    self.encoder = nnx.List(encoder)
    self.downsamplers = nnx.List(downsamplers)
    # Decoder: every stage but the bottleneck, coarse to fine; the first block of a
    # stage takes [upsampled, skip] concatenated.
    decoder, upsamplers = [], []
    for s in reversed(range(self.num_stages - 1)):
      upsamplers.append(_conv(cin, cin, dtype=dtype, rngs=rngs))
      cin = cin + channels[s]
      blocks = []
      for _ in range(num_blocks[s]):
        blocks.append(res_block(cin, channels[s], s))
        cin = channels[s]
      decoder.append(nnx.List(blocks))
    self.decoder = nnx.List(decoder)
    self.upsamplers = nnx.List(upsamplers)
    self.head_norm = nnx.GroupNorm(cin, num_groups=num_groups, epsilon=GN_EPS, dtype=dtype,
                                   rngs=rngs)
    self.head = _conv(cin, out_channels, zero=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    """Args:
      x: (B, H, W, Cin) network input (EDM: c_in * noisy image).
      t: (B,) noise conditioning (EDM: c_noise = ln(sigma) / 4).
      y: (B,) int labels in [0, num_classes] for a conditional model, else None.
      rng: dropout key during training; None is deterministic.

    Returns:
      (B, H, W, Cout).
    """
    if (y is None) != (self.y_embedder is None):
      raise ValueError("labels must be given exactly when the model is class-conditional "
                       f"(num_classes={self.num_classes}).")
    c = self.t_embedder(t)  # (B, Dt)
    if self.y_embedder is not None:
      c = c + self.y_embedder(y)
    keys = itertools.count()  # one dropout key per block: fold_in(rng, block index)
    next_key = lambda: None if rng is None else jax.random.fold_in(rng, next(keys))

    h = self.tokenizer(x)  # (B, H, W, C0)
    skips = []
    for s, blocks in enumerate(self.encoder):
      for block in blocks:
        h = block(h, c, next_key())
      if s < self.num_stages - 1:
        skips.append(h)
        h = self.downsamplers[s](h)  # (B, H/2, W/2, C)
    for up, blocks in zip(self.upsamplers, self.decoder):
      b, hh, ww, ch = h.shape
      h = up(jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), "nearest"))  # (B, 2H, 2W, C)
      h = jnp.concatenate([h, skips.pop()], axis=-1)  # (B, 2H, 2W, C + C_skip)
      for block in blocks:
        h = block(h, c, next_key())
    return self.head(self.head_norm(h))  # (B, H, W, Cout)
