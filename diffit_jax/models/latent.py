"""Latent DiffiT (paper §3.2 "Latent Space", App. H.2), exactly the official release.

SD-VAE latent -> PatchEmbed + fixed 2-D sin-cos position embedding -> depth x
DiffiTBlock(x, c) with global-window TMSA -> FinalLayer (LN -> SiLU -> Linear) ->
unpatchify to eps (+ the learned-variance interpolation channels). The time token is
c = t_emb + y_emb (labels enter only through TMSA; there is no AdaLN). Parameter
names, tensor layouts and initialisation follow docs/official_checkpoint.md so that the
converter is a transpose per tensor. XL/2 at 256 px has 561,035,232 parameters.

The blocks are one stacked module (parameters carry a leading `depth` axis). Scanned
(`scan_blocks=True`), a 28-block network compiles as fast as one block; unrolled
(`scan_blocks=False`), a training step runs faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffit_jax.models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from diffit_jax.models.tmsa import LN_EPS, DiffiTBlock

# The size table: variant name -> depth / width / heads. Patch size is the "/p" suffix.
LATENT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
# What a rematerialised block keeps for the backward pass (`remat=True`), by name:
#   "nothing"       recompute the whole block (least memory, one extra forward).
#   "dots_no_batch" keep the outputs of the linear layers (q/k/v, projections, MLP) and
#                   recompute only attention and the elementwise ops: the (B, heads, T, T)
#                   attention matrices, the largest activations, are never stored.
#   "dots"          also keep the attention matmuls' outputs.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def latent_variant(name: str) -> dict:
  """'XL/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
  size, _, patch = name.partition("/")
  if size not in LATENT_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f"unknown latent DiffiT variant {name!r}; use one of "
                     f"{[f'{s}/{p}' for s in LATENT_SIZES for p in PATCH_SIZES]}.")
  return dict(LATENT_SIZES[size], patch_size=int(patch))


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, h*w, p*p*C) tokens -> (B, h*p, w*p, C) image; the official (p, p, C) order."""
  b, n, _ = x.shape
  h = w = int(round(n ** 0.5))
  p = patch_size
  x = x.reshape(b, h, w, p, p, channels)  # (B, h, w, p, p, C)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
  return x.reshape(b, h * p, w * p, channels)  # (B, H, W, C)


class PatchEmbed(nnx.Module):
  """Conv2d(k=p, s=p): (B, H, W, Cin) -> (B, H/p, W/p, D)."""

  def __init__(self, in_channels: int, hidden_size: int, patch_size: int, *, dtype, rngs):
    # Official init: xavier-uniform on the flattened (D, Cin*p*p) weight, zero bias.
    self.proj = nnx.Conv(in_channels, hidden_size, (patch_size, patch_size),
                         strides=(patch_size, patch_size), padding="VALID",
                         kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                         bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class FinalLayer(nnx.Module):
  """LN (no affine) -> SiLU -> zero-initialised Linear(D, p*p*Cout)."""

  def __init__(self, hidden_size: int, out_features: int, *, dtype, rngs):
    self.norm_final = nnx.LayerNorm(hidden_size, epsilon=LN_EPS, use_scale=False, use_bias=False,
                                    dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(hidden_size, out_features, kernel_init=nnx.initializers.zeros,
                             bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(nnx.silu(self.norm_final(x)))


class LatentDiffiT(nnx.Module):
  """The latent DiffiT of the official release: `(x_t, t, y) -> eps [, v]`.

  Args:
    input_size: latent side (32 for 256 px, 64 for 512 px).
    patch_size: 2, 4 or 8.
    in_channels: latent channels (4 for the SD VAE).
    hidden_size, depth, num_heads, mlp_ratio: the transformer (see `LATENT_SIZES`).
    num_classes: number of classes; the label table has one more row (the null
      class). 0 builds an unconditional model without a label table.
    learn_sigma: also predict the variance interpolation (doubles output channels).
    window_size: TMSA window in tokens; None is the whole grid (the official setting).
    remat: rematerialise each block in the backward pass (saves memory); needs
      `scan_blocks`.
    remat_policy: what a rematerialised block keeps (`REMAT_POLICIES`); ignored
      without `remat`.
    attention: how TMSA computes attention (`tmsa.ATTENTION_IMPLEMENTATIONS`).
    scan_blocks: run the blocks in a `jax.lax.scan` (fast compiles); False runs them as
      straight-line code (faster steps, less memory, slower compiles).
    scan_unroll: blocks per scan iteration (`jax.lax.scan`'s `unroll`) when scanning.
    dtype: computation dtype (parameters stay float32).
  """

  def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = True,
               window_size: int | None = None, remat: bool = False,
               remat_policy: str = "nothing", attention: str = "auto",
               scan_blocks: bool = True, scan_unroll: int = 1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if input_size % patch_size:
      raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}.")
    grid = input_size // patch_size
    window_size = window_size or grid
    if grid % window_size:
      raise ValueError(f"window_size {window_size} does not divide the {grid}x{grid} token grid.")
    self.input_size = input_size
    self.patch_size = patch_size
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.hidden_size = hidden_size
    self.num_classes = num_classes
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat_policy={remat_policy!r}; use one of "
                       f"{sorted(REMAT_POLICIES)}.")
    self.remat = remat
    self.remat_policy = remat_policy
    if remat and not scan_blocks:
      # Measured with XLA's memory analysis: in straight-line code XLA schedules each
      # block's recomputation right after its forward and keeps every activation.
      raise ValueError("config.model.remat=True needs config.model.scan_blocks=True: with "
                       "unrolled blocks XLA undoes the rematerialisation and no memory is saved.")
    if isinstance(scan_unroll, bool) or scan_unroll < 1:
      raise ValueError(f"scan_unroll={scan_unroll!r} is not a positive number of blocks; "
                       "use scan_blocks=False for no loop at all.")
    self.scan_blocks = scan_blocks
    self.scan_unroll = scan_unroll

    self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size, dtype=dtype, rngs=rngs)
    self.t_embedder = TimestepEmbedder(hidden_size, dtype=dtype, rngs=rngs)
    self.y_embedder = (LabelEmbedder(num_classes, hidden_size, dtype=dtype, rngs=rngs)
                       if num_classes > 0 else None)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return DiffiTBlock(hidden_size, num_heads, time_dim=hidden_size, window_size=window_size,
                         mlp_ratio=mlp_ratio, attention=attention, dtype=dtype, rngs=rngs)
    self.blocks = make_blocks(rngs)  # one DiffiTBlock whose parameters have a leading depth axis
    self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels,
                                  dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    """Predicts eps (and the variance interpolation) for noisy latents.

    Args:
      x: (B, H, W, Cin) noisy latents, NHWC.
      t: (B,) original DDPM timestep index in [0, 999] (int or float).
      y: (B,) int labels in [0, num_classes]; `num_classes` is the null class.
        Must be None for an unconditional model.
      rng: unused (the official latent model has no dropout); accepted so that every
        diffit_jax network shares one call signature.

    Returns:
      (B, H, W, Cout) with Cout = 2 * Cin when learn_sigma (eps, then v).
    """
    del rng
    if (y is None) != (self.y_embedder is None):
      raise ValueError("labels must be given exactly when the model is class-conditional "
                       f"(num_classes={self.num_classes}).")
    h = self.x_embedder(x)  # (B, h, w, D)
    grid = h.shape[1]
    h = h + sincos_pos_embed_2d(self.hidden_size, grid).reshape(1, grid, grid, -1)  # fixed
    c = self.t_embedder(t)  # (B, D)
    if self.y_embedder is not None:
      c = c + self.y_embedder(y)  # the time token carries the label (no activation on c)

    graphdef, block_state = nnx.split(self.blocks)
    def block(h, state):
      return nnx.merge(graphdef, state)(h, c)
    if self.remat:  # always scanned (see __init__), where CSE cannot undo the remat
      block = jax.checkpoint(block, prevent_cse=False, policy=REMAT_POLICIES[self.remat_policy])
    if not self.scan_blocks:
      # Straight-line code: the stacked parameters are split once and each block reads
      # its own slice. Without a loop XLA keeps no stacked residuals for the backward
      # (no dynamic-update-slice per block, no zero-filled stacks): a training step is
      # about 20% faster on CPU, and compiles about twice as slowly.
      leaves, treedef = jax.tree.flatten(block_state)
      per_block = zip(*(jnp.unstack(leaf) for leaf in leaves))
      for block_leaves in per_block:
        h = block(h, jax.tree.unflatten(treedef, block_leaves))  # (B, h, w, D)
    else:
      h, _ = jax.lax.scan(lambda h, state: (block(h, state), None), h, block_state,
                          unroll=self.scan_unroll)  # (B, h, w, D)

    out = self.final_layer(h.reshape(h.shape[0], grid * grid, -1))  # (B, N, p*p*Cout)
    return unpatchify(out, self.patch_size, self.out_channels)  # (B, H, W, Cout)
