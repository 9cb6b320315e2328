"""The Stable Diffusion VAE (`AutoencoderKL`) in Flax NNX, NHWC throughout.

This file owns the first-stage autoencoder of latent diffusion: the KL-regularised
autoencoder of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models" (LDM, arXiv 2112.10752, Sec. 3.1 and App. G), with the architecture of
diffusers' `AutoencoderKL` as used by `stabilityai/sd-vae-ft-ema` and `sd-vae-ft-mse`
(block_out_channels 128/256/512/512, 2 ResNet layers per block, 4 latent channels,
single-head attention in the mid blocks, GroupNorm(32, eps 1e-6), SiLU). Latent
DiffiT (arXiv 2312.02139, Sec. 4) trains and samples in this VAE's latent space.

Submodule and parameter names follow diffusers (`encoder.down_blocks.0.resnets.1.conv1`)
so that `diffit_jax.convert.vae` is a near one-to-one renaming; the only differences are
that diffusers' one-element lists are single modules here (`downsamplers.0` is
`downsample`, `upsamplers.0` is `upsample`, `attentions.0` is `attention`, `to_out.0` is
`to_out`) and Flax leaf names (`kernel`, `scale`) replace `weight`.

The latent scale `LATENT_SCALE` is defined here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LATENT_SCALE = 0.18215
"""Multiplies VAE latents before diffusion and divides them before decoding.

It is the inverse standard deviation of SD-VAE latents on the first training batch
(LDM Sec. 4.3.2 and App. D.1; diffusers' `scaling_factor`), which brings the latents
to roughly unit variance. DiffiT's official sampler decodes `z / 0.18215`.
"""

# Posterior log-variance bounds of diffusers' `DiagonalGaussianDistribution`: they keep
# exp(logvar) finite for untrained or fine-tuned encoders.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Every GroupNorm of the SD VAE uses this epsilon (diffusers `resnet_eps=1e-6`).
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an SD-style `AutoencoderKL`; the defaults are the SD VAE.

  Attributes:
    in_channels: image channels in.
    out_channels: image channels out.
    block_out_channels: channels of each resolution level; the image is downsampled
      by 2 between levels, so latents are `2 ** (len - 1)` times smaller.
    layers_per_block: ResNet blocks per encoder level (the decoder uses one more).
    latent_channels: channels of the latent (the posterior mean).
    norm_num_groups: GroupNorm groups everywhere; must divide every channel count.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels or self.layers_per_block < 1:
      raise ValueError(f"VAEConfig needs at least one level and one layer per block, got {self}.")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
          f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad}; "
          "choose a group count that divides every entry of block_out_channels.")

  @property
  def downsample_factor(self) -> int:
    """How many times smaller the latent is than the image, per side."""
    return 2 ** (len(self.block_out_channels) - 1)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict (stored in checkpoint metadata)."""
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
    """Inverse of `to_dict`; rejects unknown fields so a typo cannot pass silently."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown VAEConfig fields {unknown}; known fields are {sorted(names)}.")
    return cls(**d)


def _conv(in_ch: int, out_ch: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs,
          stride: int = 1, padding: Any = "SAME") -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, padding=padding,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _group_norm(ch: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on large activations, and the
  # converter's parity test asks for 1e-4 relative agreement with PyTorch.
  return nnx.GroupNorm(ch, num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x)))))) (diffusers `ResnetBlock2D`)."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _group_norm(in_ch, groups, **kw)
    self.conv1 = _conv(in_ch, out_ch, 3, **kw)
    self.norm2 = _group_norm(out_ch, groups, **kw)
    self.conv2 = _conv(out_ch, out_ch, 3, **kw)
    # A 1x1 projection only where the channel count changes (LDM's `nin_shortcut`).
    self.conv_shortcut = _conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """Single-head self-attention over all pixels, with a residual (diffusers `Attention` in the mid block)."""

  def __init__(self, ch: int, *, groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = _group_norm(ch, groups, **kw)
    self.to_q = nnx.Linear(ch, ch, **kw)
    self.to_k = nnx.Linear(ch, ch, **kw)
    self.to_v = nnx.Linear(ch, ch, **kw)
    self.to_out = nnx.Linear(ch, ch, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)  # (B, N, C), N = H * W
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)  # (B, N, C) each
    # Softmax in float32 whatever the compute dtype (diffusers `upcast_softmax=True`).
    logits_bnm = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32)  # (B, N, N)
    attn_bnm = jax.nn.softmax(logits_bnm * c ** -0.5, axis=-1).astype(v.dtype)  # (B, N, N)
    out = jnp.einsum("bnm,bmc->bnc", attn_bnm, v)  # (B, N, C)
    return x + self.to_out(out).reshape(b, h, w, c)  # (B, H, W, C)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv with zero padding on the bottom/right only (LDM's asymmetric padding)."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)  # (B, H/2, W/2, C)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Repeating rows and columns is exactly torch's `interpolate(scale_factor=2, mode="nearest")`.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, C)
    return self.conv(x)


class DownEncoderBlock(nnx.Module):
  """One encoder resolution level: ResNet blocks, then (except the last level) a downsample."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_downsample: bool,
               groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
        [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **kw) for i in range(num_layers)])
    self.downsample = (Downsample(out_ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpDecoderBlock(nnx.Module):
  """One decoder resolution level: ResNet blocks, then (except the last level) an upsample."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_upsample: bool,
               groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
        [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **kw) for i in range(num_layers)])
    self.upsample = (Upsample(out_ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                     if add_upsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsample is None else self.upsample(x)


class MidBlock(nnx.Module):
  """ResNet -> attention -> ResNet at the lowest resolution (diffusers `UNetMidBlock2D`)."""

  def __init__(self, ch: int, *, groups: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(ch, ch, **kw), ResnetBlock(ch, ch, **kw)])
    self.attention = Attention(ch, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attention(self.resnets[0](x)))


class Encoder(nnx.Module):
  """Image (B, H, W, in) -> posterior moments (B, H/f, W/f, 2 * latent), f = 2 ** (levels - 1)."""

  def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    chs, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = _conv(config.in_channels, chs[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock(chs[max(i - 1, 0)], ch, num_layers=config.layers_per_block,
                         add_downsample=i < len(chs) - 1, groups=groups, **kw)
        for i, ch in enumerate(chs)])
    self.mid_block = MidBlock(chs[-1], groups=groups, **kw)
    self.conv_norm_out = _group_norm(chs[-1], groups, **kw)
    self.conv_out = _conv(chs[-1], 2 * config.latent_channels, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)  # (B, H, W, C0)
    for block in self.down_blocks:
      x = block(x)  # (B, H/f, W/f, C_last) after the last level
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))  # (B, H/f, W/f, 2 * latent)


class Decoder(nnx.Module):
  """Latent (B, h, w, latent) -> image (B, h*f, w*f, out); the levels mirror the encoder's."""

  def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    chs, groups = config.block_out_channels[::-1], config.norm_num_groups
    self.conv_in = _conv(config.latent_channels, chs[0], 3, **kw)
    self.mid_block = MidBlock(chs[0], groups=groups, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock(chs[max(i - 1, 0)], ch, num_layers=config.layers_per_block + 1,
                       add_upsample=i < len(chs) - 1, groups=groups, **kw)
        for i, ch in enumerate(chs)])
    self.conv_norm_out = _group_norm(chs[-1], groups, **kw)
    self.conv_out = _conv(chs[-1], config.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))  # (B, h, w, C_last)
    for block in self.up_blocks:
      x = block(x)  # (B, h*f, w*f, C0) after the last level
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))  # (B, H, W, out)


class AutoencoderKL(nnx.Module):
  """The SD VAE: `encode` images to a diagonal Gaussian posterior, `decode` latents to images.

  Images are NHWC in [-1, 1]; latents are NHWC and unscaled (multiply by `LATENT_SCALE`
  before diffusion: `diffit_jax.data.latents.sample_latent`; `from_latent` undoes it). Parameters are stored in
  `param_dtype`; convolutions and matmuls run in `dtype` (GroupNorm statistics and the
  attention softmax in float32 regardless). Both methods return float32.

  Build random weights with `AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0))`, or load
  converted SD weights with `diffit_jax.convert.vae.load_vae(path)`.
  """

  def __init__(self, config: VAEConfig = VAEConfig(), *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the autoencoder.

    Args:
      config: the architecture; the default is the SD VAE (83.65 M parameters).
      dtype: compute dtype (e.g. `jnp.bfloat16` for faster decoding).
      param_dtype: parameter dtype.
      rngs: initialisation randomness.
    """
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    lat = config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = _conv(2 * lat, 2 * lat, 1, **kw)
    self.post_quant_conv = _conv(lat, lat, 1, **kw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior q(z | x) = N(mean, exp(logvar)) of images `x`.

    Args:
      x: images (B, H, W, in_channels) in [-1, 1]; H and W divisible by
        `config.downsample_factor`.

    Returns:
      (mean, logvar), each (B, H/f, W/f, latent_channels) float32; logvar is clipped to
      [-30, 20] like diffusers.
    """
    with jax.named_scope("vae_encode"):
      moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)  # (B, h, w, 2 * latent)
      mean, logvar = jnp.split(moments, 2, axis=-1)  # (B, h, w, latent) each
      return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Images from unscaled latents `z` (B, h, w, latent_channels).

    Returns:
      (B, h*f, w*f, out_channels) float32, nominally in [-1, 1] but NOT clamped here:
      callers clamp when they quantise to uint8, so parity checks see the raw output.
    """
    with jax.named_scope("vae_decode"):
      return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)


def from_latent(z: jax.Array) -> jax.Array:
  """Undoes the `LATENT_SCALE` scaling, giving latents that `AutoencoderKL.decode` takes."""
  return z / LATENT_SCALE
